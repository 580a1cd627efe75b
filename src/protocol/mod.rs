//! Client wire formats. Decodes client frames and encodes server frames; never touches sockets.

pub mod phoenix;
