//! Chaining: the output of one function as the input of the next, as a stored, named chain
//! (seed 001 F2.2). [`definition`] is the workflow language (sequences, `parallel`, `map`,
//! `choice`, `retry`, `catch`, a run's `timeout_ms`), [`engine`] walks it over a [`Steps`]
//! that runs each call, and [`model`] has the records a run leaves. The platform runs steps as
//! ordinary invocations and keeps runs durable (`crate::platform`); this module knows neither
//! sandboxes nor the store.

pub mod definition;
pub mod engine;
pub mod model;
#[cfg(test)]
mod tests;

pub use definition::{Definition, DefinitionError, Kind, Step, Target};
pub use engine::{Caps, Failure, Steps};
pub use model::{Chain, ChainRun, RunStatus, StepRecord};
