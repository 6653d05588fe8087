//! HTTP tests against the real server. One module per URL area.

mod helpers;
mod smtp_sink;

mod accounts;
mod auth;
mod me;
mod mfa;
mod ops;
mod pages;
mod plans;
mod ratelimit;
mod usage;
mod walk;
