mod auth;
mod bench;
mod capture;
mod clients;
mod gateway;
mod ops;
mod realtime;
mod rls;
