//! HTTP tests against the real server. One module per URL area.

mod fake_stripe;
mod helpers;
mod smtp_sink;

mod accounts;
mod admin;
mod admin_accounts;
mod admin_plans;
mod admin_reports;
mod api_keys;
mod auth;
mod authorization;
mod billing;
mod credits;
mod me;
mod mfa;
mod ops;
mod pages;
mod plans;
mod ratelimit;
mod usage;
mod walk;
