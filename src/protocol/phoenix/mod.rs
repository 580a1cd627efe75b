//! The Phoenix channel protocol of the Supabase Realtime clients: the serializers (`codec`), the
//! encoder of core events (`encoder`), and the driver that turns client frames into session
//! calls and Supabase's replies (`connection`). No sockets, no database.

pub mod codec;
pub mod connection;
pub mod encoder;

pub use codec::{decode_binary, decode_text, encode, BinaryPush, ClientFrame, FrameError, Vsn};
pub use connection::PhoenixConnection;
pub use encoder::PhoenixEncoder;
