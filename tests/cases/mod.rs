mod capture;
mod gateway;
