//! Kafka adapter: envelope codec, consumer loop, dispatch by topic, dead letters, Redis fast path, outbox relay.

pub mod broker;
pub mod codec;
pub mod consumer;
pub mod dedupe;
mod delivery;
pub mod dlq;
pub mod handlers;
mod processor;
pub mod relay;
pub mod scanner;
mod window;
