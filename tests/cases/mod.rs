mod capture;
mod clients;
mod gateway;
mod ops;
