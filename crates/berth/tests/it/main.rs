//! One integration-test binary: every test drives a real `berth serve` process over HTTP.

mod support;

mod abuse;
mod api_base;
mod api_blobs;
mod api_manifests;
mod api_referrers;
mod api_tags;
mod api_uploads;
mod audit;
mod auth;
mod chaos;
mod clients;
mod config;
mod containerd;
mod copy;
mod crash;
mod federation;
mod gc;
mod integrity;
mod lifecycle;
mod manage_api;
mod multinode;
mod namespace_rules;
mod observability;
mod oras;
#[cfg(feature = "otel")]
mod otel;
mod postgres;
mod resources;
mod s3;
mod scrub;
mod tls;
mod webhooks;
