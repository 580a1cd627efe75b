mod capture;
mod clients;
mod gateway;
