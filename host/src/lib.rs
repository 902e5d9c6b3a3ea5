//! # vllm-router
//!
//! An OpenAI-compatible HTTP router in front of vLLM workers. The host (this crate) does
//! HTTP/SSE forwarding, health checks, retries and metrics; the load-balancing decision
//! is made by a WebAssembly component implementing `wit/policy.wit`, run by the crate
//! `vllm-router-runtime` (which knows no HTTP).
//!
//! Module map (each concern has one home):
//! - [`app`]: the composition root (builds everything from [`config`]'s flags);
//! - [`server`]: routes, body validation, request ids, admission control; [`error`]:
//!   OpenAI-style JSON errors; [`request`]: the request as the router sees it;
//! - [`forward`]: **the forwarding core** — where a worker is chosen (`pick`), where
//!   retries happen (`drive`, with the retry budget in `forward::retry`), where an
//!   attempt's outcome is recorded (`settle`), and the streaming body;
//! - [`pd`]: the prefill/decode flow, a plan over `forward`; [`discovery`]: vLLM ZMQ;
//! - [`policy`]: candidates, the policy call and its fallback; `policy::loader` (the
//!   [`policy::loader::SlotLoader`], where a policy file becomes the serving version);
//!   `policy::slots` (A/B
//!   and shadow slots); `policy::sync` (worker sets pushed to policies); `policy::builtin`;
//! - [`watch`]: hot swap on file change; [`admin`]: the authenticated admin API;
//! - [`workers`]: the registry and per-worker state; [`breaker`]: circuit breaker (owns
//!   request-outcome ejection); [`health`]: active probes (own up/down); [`engine`]:
//!   vLLM engine-load scraping;
//! - [`metrics`]: the router's Prometheus metrics (+ registry gauges as a Collector);
//!   [`fleet`]: the workers' vLLM metrics summed for `GET /metrics` on the serving port;
//! - [`serve`]: `vllm-router serve MODEL …` (engines + router in one command);
//!   [`util`]: the shared clock;
//! - [`policy_tool`]: `vllm-router policy check|new` (offline tools for policy teams;
//!   templates in [`policy_templates`]).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod breaker;
pub mod chart;
pub mod clients;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod health;
pub mod k8s;
pub mod kv;
pub mod listener;
pub mod metrics;
pub mod pd;
pub mod policy;
pub mod policy_replay;
pub mod policy_templates;
pub mod policy_tool;
pub mod request;
pub mod serve;
pub mod server;
pub mod tls;
pub mod trace;
pub mod util;
pub mod watch;
pub mod workers;
