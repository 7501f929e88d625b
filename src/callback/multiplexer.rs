//! Run several handlers in priority order, isolating their failures.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::registry::{erase_async, erase_blocking, guarded, ErasedHandler};
use super::{CallbackError, Registry};
use crate::retry::Outcome;

/// Several handlers run one after the other on the same payload, highest
/// priority first (ties keep the order they were added in).
///
/// A failure of one handler ([`Outcome::Dead`], [`Outcome::Retry`] or a
/// panic) is logged at error level with the handler's name and does not
/// stop the others. [`run`](Self::run) returns every outcome, in run order.
///
/// Each handler deserializes the payload into its own type, as registry
/// handlers do; one that cannot gets [`Outcome::Dead`].
///
/// ```
/// use taskherd::callback::Multiplexer;
/// use taskherd::retry::Outcome;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut mux = Multiplexer::new();
/// mux.add("audit", 0, |_: serde_json::Value| async { Outcome::Done })
///     .add("charge", 10, |_: serde_json::Value| async { Outcome::Dead("card refused".into()) })
///     .add("notify", 5, |_: serde_json::Value| async { Outcome::Done });
/// let results = mux.run(serde_json::json!({"order": 7})).await;
/// let order: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
/// assert_eq!(order, ["charge", "notify", "audit"]);
/// assert_eq!(results[0].outcome, Outcome::Dead("card refused".into()));
/// assert_eq!(results[2].outcome, Outcome::Done);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Multiplexer {
    /// The handlers, kept in run order.
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    name: String,
    priority: i32,
    handler: ErasedHandler,
}

/// The outcome of one handler of a [`Multiplexer`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiplexedOutcome {
    /// The handler's name, as added.
    pub name: String,
    /// Its priority.
    pub priority: i32,
    /// How it ended; a panic shows as [`Outcome::Retry`]`(None)`.
    pub outcome: Outcome,
}

impl std::fmt::Debug for Multiplexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<(&str, i32)> = self
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.priority))
            .collect();
        f.debug_struct("Multiplexer")
            .field("entries", &entries)
            .finish()
    }
}

impl Multiplexer {
    /// An empty multiplexer.
    pub fn new() -> Self {
        Multiplexer::default()
    }

    /// Adds an async handler. Higher `priority` runs first; equal
    /// priorities run in the order they were added. Names label logs and
    /// results and need not be unique.
    ///
    /// ```
    /// use taskherd::callback::Multiplexer;
    /// use taskherd::retry::Outcome;
    /// let mut mux = Multiplexer::new();
    /// mux.add("a", 1, |n: u32| async move { Outcome::Done });
    /// assert_eq!(mux.len(), 1);
    /// ```
    pub fn add<P, F, Fut>(
        &mut self,
        name: impl Into<String>,
        priority: i32,
        handler: F,
    ) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let name = name.into();
        let handler = erase_async(&name, handler);
        self.insert(name, priority, handler)
    }

    /// Adds a blocking handler, run on tokio's blocking pool; otherwise as
    /// [`add`](Self::add).
    ///
    /// ```
    /// use taskherd::callback::Multiplexer;
    /// use taskherd::retry::Outcome;
    /// let mut mux = Multiplexer::new();
    /// mux.add_blocking("fsync", 0, |_: ()| Outcome::Done);
    /// assert_eq!(mux.names().collect::<Vec<_>>(), ["fsync"]);
    /// ```
    pub fn add_blocking<P, F>(
        &mut self,
        name: impl Into<String>,
        priority: i32,
        handler: F,
    ) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Outcome + Send + Sync + 'static,
    {
        let name = name.into();
        let handler = erase_blocking(&name, handler);
        self.insert(name, priority, handler)
    }

    /// Adds the handler registered as `name` in `registry`.
    ///
    /// # Errors
    ///
    /// [`CallbackError::UnknownHandler`] if `registry` has no such handler
    /// (checked now, rather than failing on every run).
    ///
    /// ```
    /// use taskherd::callback::{CallbackError, Multiplexer, Registry};
    /// use taskherd::retry::Outcome;
    ///
    /// let mut registry = Registry::new();
    /// registry.register("log", |_: serde_json::Value| async { Outcome::Done }).unwrap();
    /// let mut mux = Multiplexer::new();
    /// mux.add_registered(&registry, "log", 0).unwrap();
    /// assert!(matches!(
    ///     mux.add_registered(&registry, "nope", 0),
    ///     Err(CallbackError::UnknownHandler { .. })
    /// ));
    /// ```
    pub fn add_registered(
        &mut self,
        registry: &Registry,
        name: &str,
        priority: i32,
    ) -> Result<&mut Self, CallbackError> {
        match registry.get(name) {
            Some(handler) => Ok(self.insert(name.to_string(), priority, handler)),
            None => Err(CallbackError::UnknownHandler {
                name: name.to_string(),
            }),
        }
    }

    fn insert(&mut self, name: String, priority: i32, handler: ErasedHandler) -> &mut Self {
        // After every entry of the same or a higher priority: stable.
        let at = self.entries.partition_point(|e| e.priority >= priority);
        self.entries.insert(
            at,
            Entry {
                name,
                priority,
                handler,
            },
        );
        self
    }

    /// The number of handlers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no handlers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The handler names in run order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Runs every handler on (a copy of) `payload`, one at a time in
    /// priority order, and returns their outcomes in run order.
    ///
    /// Failures are logged (`tracing::error!` with the fields `handler`,
    /// `priority` and `outcome`) and never stop the run.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops at the handler in progress: the ones after
    /// it do not run.
    pub async fn run(&self, payload: Value) -> Vec<MultiplexedOutcome> {
        let mut results = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            let handler = &entry.handler;
            let input = payload.clone();
            let outcome = guarded(&entry.name, async move { handler(input).await }).await;
            if !outcome.is_done() {
                tracing::error!(
                    handler = %entry.name,
                    priority = entry.priority,
                    outcome = ?outcome,
                    "multiplexed handler failed; running the others"
                );
            }
            results.push(MultiplexedOutcome {
                name: entry.name.clone(),
                priority: entry.priority,
                outcome,
            });
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    type Trace = Arc<Mutex<Vec<String>>>;

    fn traced(
        trace: &Trace,
        name: &'static str,
        outcome: Outcome,
    ) -> impl Fn(Value) -> futures::future::Ready<Outcome> + Send + Sync + 'static {
        let trace = Arc::clone(trace);
        move |_| {
            trace.lock().expect("trace").push(name.to_string());
            futures::future::ready(outcome.clone())
        }
    }

    #[tokio::test]
    async fn runs_by_priority_stable_and_isolates_failures() {
        let trace = Trace::default();
        let mut mux = Multiplexer::new();
        mux.add("low", -5, traced(&trace, "low", Outcome::Done))
            .add("first-10", 10, traced(&trace, "first-10", Outcome::Done))
            .add(
                "dead",
                3,
                traced(&trace, "dead", Outcome::Dead("broken".into())),
            )
            .add("panics", 3, {
                let trace = Arc::clone(&trace);
                move |_: Value| {
                    let trace = Arc::clone(&trace);
                    async move {
                        trace.lock().expect("trace").push("panics".into());
                        tokio::task::yield_now().await;
                        panic!("handler bug")
                    }
                }
            })
            .add(
                "second-10",
                10,
                traced(&trace, "second-10", Outcome::Retry(None)),
            )
            .add("tail", 3, traced(&trace, "tail", Outcome::Done));
        assert_eq!(mux.len(), 6);
        let expected = ["first-10", "second-10", "dead", "panics", "tail", "low"];
        assert_eq!(mux.names().collect::<Vec<_>>(), expected);

        let results = mux.run(json!({"x": 1})).await;
        assert_eq!(*trace.lock().expect("trace"), expected);
        let got: Vec<(&str, i32, &Outcome)> = results
            .iter()
            .map(|r| (r.name.as_str(), r.priority, &r.outcome))
            .collect();
        assert_eq!(
            got,
            [
                ("first-10", 10, &Outcome::Done),
                ("second-10", 10, &Outcome::Retry(None)),
                ("dead", 3, &Outcome::Dead("broken".into())),
                ("panics", 3, &Outcome::Retry(None)),
                ("tail", 3, &Outcome::Done),
                ("low", -5, &Outcome::Done),
            ]
        );
    }

    #[tokio::test]
    async fn a_synchronous_panic_and_a_blocking_panic_are_isolated() {
        let mut mux = Multiplexer::new();
        mux.add(
            "sync-panic",
            2,
            |_: Value| -> futures::future::Ready<Outcome> { panic!("before the future") },
        )
        .add_blocking("blocking-panic", 1, |_: Value| -> Outcome {
            panic!("on the blocking pool")
        })
        .add_blocking("ok", 0, |_: Value| Outcome::Done);
        let results = mux.run(Value::Null).await;
        let outcomes: Vec<_> = results.into_iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Retry(None), Outcome::Retry(None), Outcome::Done]
        );
    }

    #[tokio::test]
    async fn each_handler_gets_its_own_typed_payload() {
        #[derive(serde::Deserialize)]
        struct Order {
            id: u32,
        }
        let mut mux = Multiplexer::new();
        mux.add("typed", 1, |order: Order| async move {
            if order.id == 7 {
                Outcome::Done
            } else {
                Outcome::Retry(None)
            }
        })
        .add("wrong-type", 0, |_: Vec<String>| async { Outcome::Done });
        let results = mux.run(json!({"id": 7})).await;
        assert_eq!(results[0].outcome, Outcome::Done);
        assert!(
            matches!(&results[1].outcome, Outcome::Dead(reason) if reason.contains("bad payload")),
            "{:?}",
            results[1]
        );
    }

    #[tokio::test]
    async fn registered_handlers_and_empty() {
        let mut registry = Registry::new();
        registry
            .register("double", |n: u32| async move {
                if n * 2 == 8 {
                    Outcome::Done
                } else {
                    Outcome::Dead(format!("{n}"))
                }
            })
            .expect("register");
        let mut mux = Multiplexer::new();
        assert!(mux.is_empty());
        assert!(mux.run(json!(4)).await.is_empty());
        mux.add_registered(&registry, "double", 0)
            .expect("known handler");
        let err = mux
            .add_registered(&registry, "missing", 0)
            .expect_err("unknown handler refused");
        assert_eq!(err.to_string(), "no handler registered as \"missing\"");
        assert_eq!(mux.run(json!(4)).await[0].outcome, Outcome::Done);
        assert_eq!(
            format!("{mux:?}"),
            "Multiplexer { entries: [(\"double\", 0)] }"
        );
    }
}
