//! Named handlers with serde payloads, and the job envelope.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::CallbackError;
use crate::retry::Outcome;

/// A handler with its payload type erased: takes the JSON payload, returns
/// the outcome. Deserialization failures are already mapped to
/// [`Outcome::Dead`]; panics are not caught yet (see [`guarded`]).
pub(crate) type ErasedHandler = Arc<dyn Fn(Value) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// Wraps a typed async handler into an [`ErasedHandler`].
pub(crate) fn erase_async<P, F, Fut>(name: &str, handler: F) -> ErasedHandler
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let name = name.to_string();
    let handler = Arc::new(handler);
    Arc::new(move |payload: Value| {
        let payload = serde_json::from_value::<P>(payload);
        let name = name.clone();
        let handler = Arc::clone(&handler);
        async move {
            match payload {
                // The call itself happens inside the future, so that a
                // handler panicking before its first await is caught along
                // with the rest by `guarded`.
                Ok(payload) => handler(payload).await,
                Err(err) => Outcome::Dead(bad_payload(&name, &err)),
            }
        }
        .boxed()
    })
}

/// Wraps a typed blocking handler into an [`ErasedHandler`] that runs it on
/// tokio's blocking pool.
pub(crate) fn erase_blocking<P, F>(name: &str, handler: F) -> ErasedHandler
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(P) -> Outcome + Send + Sync + 'static,
{
    let name = name.to_string();
    let handler = Arc::new(handler);
    Arc::new(move |payload: Value| {
        let payload = serde_json::from_value::<P>(payload);
        let name = name.clone();
        let handler = Arc::clone(&handler);
        async move {
            let payload = match payload {
                Ok(payload) => payload,
                Err(err) => return Outcome::Dead(bad_payload(&name, &err)),
            };
            match tokio::task::spawn_blocking(move || handler(payload)).await {
                Ok(outcome) => outcome,
                Err(err) if err.is_panic() => {
                    let message = crate::error_text::panic_text(err.into_panic().as_ref());
                    tracing::error!(handler = %name, panic = %message, "handler panicked");
                    Outcome::Retry(None)
                }
                Err(err) => {
                    // The runtime is shutting down: the job was not run to
                    // the end, so it must run again.
                    tracing::warn!(handler = %name, cause = %err, "blocking handler cancelled");
                    Outcome::Retry(None)
                }
            }
        }
        .boxed()
    })
}

fn bad_payload(name: &str, err: &serde_json::Error) -> String {
    format!("bad payload for handler {name:?}: {err}")
}

/// Runs `future` (a handler run named `name`), turning a panic into
/// [`Outcome::Retry`]`(None)` logged at error level: a panic is never a
/// success, and the retry policy decides whether it runs again.
pub(crate) async fn guarded(name: &str, future: impl Future<Output = Outcome>) -> Outcome {
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = crate::error_text::panic_text(panic.as_ref());
            tracing::error!(handler = %name, panic = %message, "handler panicked");
            Outcome::Retry(None)
        }
    }
}

/// Named handlers: the code that jobs refer to by name.
///
/// A job never carries code, only a handler name and a JSON payload
/// ([`Job`]); the registry maps the name to a handler compiled into the
/// program and deserializes the payload into the handler's own type.
///
/// A registry is filled at start-up and then shared read-only (usually in
/// an `Arc`) by workers, tickers and multiplexers.
///
/// ```
/// use serde::Deserialize;
/// use taskherd::callback::Registry;
/// use taskherd::retry::Outcome;
///
/// #[derive(Deserialize)]
/// struct Email {
///     to: String,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), taskherd::callback::CallbackError> {
/// let mut registry = Registry::new();
/// registry.register("send_email", |email: Email| async move {
///     if email.to.contains('@') {
///         Outcome::Done
///     } else {
///         Outcome::Dead(format!("bad address {:?}", email.to))
///     }
/// })?;
/// let outcome = registry
///     .call("send_email", serde_json::json!({"to": "a@example.com"}))
///     .await;
/// assert_eq!(outcome, Outcome::Done);
/// assert!(matches!(
///     registry.call("nope", serde_json::json!(null)).await,
///     Outcome::Dead(_)
/// ));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    /// The handlers by name.
    handlers: HashMap<String, ErasedHandler>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.names().collect();
        names.sort_unstable();
        f.debug_struct("Registry")
            .field("handlers", &names)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers an async handler under `name`. Its payload type `P` is
    /// deserialized from the job's JSON payload.
    ///
    /// # Errors
    ///
    /// [`CallbackError::DuplicateHandler`] if `name` is taken (the first
    /// handler stays).
    ///
    /// ```
    /// use taskherd::callback::{CallbackError, Registry};
    /// use taskherd::retry::Outcome;
    ///
    /// let mut registry = Registry::new();
    /// registry.register("noop", |_: ()| async { Outcome::Done }).unwrap();
    /// let again = registry.register("noop", |_: ()| async { Outcome::Done });
    /// assert!(matches!(again, Err(CallbackError::DuplicateHandler { .. })));
    /// ```
    pub fn register<P, F, Fut>(
        &mut self,
        name: impl Into<String>,
        handler: F,
    ) -> Result<&mut Self, CallbackError>
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let name = name.into();
        let erased = erase_async(&name, handler);
        self.insert(name, erased)
    }

    /// Registers a blocking (synchronous) handler under `name`; each call
    /// runs on tokio's blocking thread pool (`spawn_blocking`), so it may
    /// do blocking I/O or long computations without stalling the runtime.
    ///
    /// # Errors
    ///
    /// [`CallbackError::DuplicateHandler`] if `name` is taken.
    ///
    /// ```
    /// use taskherd::callback::Registry;
    /// use taskherd::retry::Outcome;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut registry = Registry::new();
    /// registry
    ///     .register_blocking("sum", |numbers: Vec<u64>| {
    ///         assert_eq!(numbers.iter().sum::<u64>(), 6);
    ///         Outcome::Done
    ///     })
    ///     .unwrap();
    /// let outcome = registry.call("sum", serde_json::json!([1, 2, 3])).await;
    /// assert_eq!(outcome, Outcome::Done);
    /// # }
    /// ```
    pub fn register_blocking<P, F>(
        &mut self,
        name: impl Into<String>,
        handler: F,
    ) -> Result<&mut Self, CallbackError>
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Outcome + Send + Sync + 'static,
    {
        let name = name.into();
        let erased = erase_blocking(&name, handler);
        self.insert(name, erased)
    }

    fn insert(&mut self, name: String, handler: ErasedHandler) -> Result<&mut Self, CallbackError> {
        if self.handlers.contains_key(&name) {
            return Err(CallbackError::DuplicateHandler { name });
        }
        self.handlers.insert(name, handler);
        Ok(self)
    }

    /// Whether a handler is registered under `name`.
    ///
    /// ```
    /// use taskherd::callback::Registry;
    /// assert!(!Registry::new().contains("x"));
    /// ```
    pub fn contains(&self, name: &str) -> bool {
        self.handlers.contains_key(name)
    }

    /// The registered names, in no particular order.
    ///
    /// ```
    /// use taskherd::callback::Registry;
    /// assert_eq!(Registry::new().names().count(), 0);
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.handlers.keys().map(String::as_str)
    }

    /// Runs the handler `name` with `payload`.
    ///
    /// Never fails: every problem is an outcome.
    /// - unknown `name`: [`Outcome::Dead`] ("unknown handler ...");
    /// - a payload that does not deserialize into the handler's type:
    ///   [`Outcome::Dead`] with the serde error;
    /// - a handler that panics: [`Outcome::Retry`]`(None)`, logged at error
    ///   level with the handler name and the panic message (a panic is never
    ///   a success; the retry policy decides).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the running handler at its current await
    /// point (a blocking handler keeps running to its end on its thread).
    ///
    /// ```
    /// use taskherd::callback::Registry;
    /// use taskherd::retry::Outcome;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut registry = Registry::new();
    /// registry.register("boom", |_: ()| async { panic!("boom") }).unwrap();
    /// registry.register("count", |n: u32| async move { Outcome::Done }).unwrap();
    /// assert_eq!(registry.call("boom", serde_json::json!(null)).await, Outcome::Retry(None));
    /// let bad = registry.call("count", serde_json::json!("ten")).await;
    /// assert!(matches!(bad, Outcome::Dead(reason) if reason.contains("bad payload")));
    /// # }
    /// ```
    pub async fn call(&self, name: &str, payload: Value) -> Outcome {
        match self.handlers.get(name) {
            Some(handler) => {
                let handler = Arc::clone(handler);
                guarded(name, async move { handler(payload).await }).await
            }
            None => Outcome::Dead(format!("unknown handler {name:?}")),
        }
    }

    /// Runs `job`: [`call`](Self::call) with its handler name and payload.
    ///
    /// # Cancel safety
    ///
    /// As [`call`](Self::call).
    ///
    /// ```
    /// use taskherd::callback::{Job, Registry};
    /// use taskherd::retry::Outcome;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut registry = Registry::new();
    /// registry.register("greet", |name: String| async move { Outcome::Done }).unwrap();
    /// let job = Job::new("greet", "world").unwrap();
    /// assert_eq!(registry.call_job(job).await, Outcome::Done);
    /// # }
    /// ```
    pub async fn call_job(&self, job: Job) -> Outcome {
        self.call(&job.handler, job.payload).await
    }

    /// The erased handler for `name`, for the multiplexer.
    pub(crate) fn get(&self, name: &str) -> Option<ErasedHandler> {
        self.handlers.get(name).cloned()
    }
}

/// What goes into a queue: the name of a handler and its payload.
///
/// On the wire: `{"handler": "send_email", "payload": {...}}`.
///
/// ```
/// use taskherd::callback::Job;
///
/// let job = Job::new("resize", serde_json::json!({"width": 100})).unwrap();
/// assert_eq!(
///     serde_json::to_value(&job).unwrap(),
///     serde_json::json!({"handler": "resize", "payload": {"width": 100}})
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The name the handler is registered under.
    pub handler: String,
    /// The handler's argument, deserialized into its payload type when the
    /// job runs.
    pub payload: Value,
}

impl Job {
    /// A job for `handler` with `payload` serialized to JSON.
    ///
    /// # Errors
    ///
    /// [`CallbackError::Serialize`] if the payload cannot be represented in
    /// JSON (a map with non-string keys, a failing `Serialize` impl).
    pub fn new(handler: impl Into<String>, payload: impl Serialize) -> Result<Job, CallbackError> {
        let handler = handler.into();
        match serde_json::to_value(payload) {
            Ok(payload) => Ok(Job { handler, payload }),
            Err(source) => Err(CallbackError::Serialize { handler, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Deserialize)]
    struct Add {
        a: u32,
        b: u32,
    }

    fn registry() -> Registry {
        let mut registry = Registry::new();
        registry
            .register("add", |add: Add| async move {
                if add.a + add.b == 3 {
                    Outcome::Done
                } else {
                    Outcome::Retry(None)
                }
            })
            .expect("register add");
        registry
            .register("panic_now", |_: ()| -> futures::future::Ready<Outcome> {
                panic!("before any await")
            })
            .expect("register panic_now");
        registry
            .register("panic_later", |_: ()| async {
                tokio::task::yield_now().await;
                panic!("after an await: {}", 42)
            })
            .expect("register panic_later");
        registry
            .register_blocking("blocking", |n: u32| {
                if n == 0 {
                    panic!("blocking panic")
                }
                Outcome::Dead(format!("n={n}"))
            })
            .expect("register blocking");
        registry
    }

    #[tokio::test]
    async fn calls_by_name_with_a_typed_payload() {
        let registry = registry();
        assert_eq!(
            registry.call("add", json!({"a": 1, "b": 2})).await,
            Outcome::Done
        );
        assert_eq!(
            registry.call("add", json!({"a": 1, "b": 5})).await,
            Outcome::Retry(None)
        );
        assert_eq!(
            registry.call("blocking", json!(7)).await,
            Outcome::Dead("n=7".into())
        );
    }

    #[tokio::test]
    async fn unknown_name_is_dead() {
        assert_eq!(
            registry().call("nope", json!({})).await,
            Outcome::Dead("unknown handler \"nope\"".into())
        );
    }

    #[tokio::test]
    async fn bad_payload_is_dead_with_the_serde_error() {
        let registry = registry();
        for name in ["add", "blocking"] {
            match registry.call(name, json!({"a": "one"})).await {
                Outcome::Dead(reason) => {
                    assert!(
                        reason.starts_with(&format!("bad payload for handler \"{name}\": ")),
                        "{reason}"
                    );
                    assert!(reason.contains("invalid type"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn panics_are_retried_never_done() {
        let registry = registry();
        for name in ["panic_now", "panic_later"] {
            assert_eq!(
                registry.call(name, json!(null)).await,
                Outcome::Retry(None),
                "{name}"
            );
        }
        assert_eq!(
            registry.call("blocking", json!(0)).await,
            Outcome::Retry(None)
        );
    }

    #[tokio::test]
    async fn duplicate_names_are_refused_and_the_first_stays() {
        let mut registry = registry();
        let err = registry
            .register("add", |_: ()| async { Outcome::Dead("second".into()) })
            .expect_err("duplicate refused");
        assert_eq!(err.to_string(), "handler \"add\" is already registered");
        assert_eq!(
            registry.call("add", json!({"a": 1, "b": 2})).await,
            Outcome::Done
        );
    }

    #[tokio::test]
    async fn handlers_are_shared_not_copied() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut registry = Registry::new();
        let counter = Arc::clone(&calls);
        registry
            .register("count", move |_: ()| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Outcome::Done
                }
            })
            .expect("register");
        let clone = registry.clone();
        registry.call("count", json!(null)).await;
        clone.call("count", json!(null)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(registry.contains("count"));
        assert_eq!(registry.names().collect::<Vec<_>>(), ["count"]);
        assert_eq!(
            format!("{registry:?}"),
            "Registry { handlers: [\"count\"] }"
        );
    }

    #[tokio::test]
    async fn job_envelope() {
        let job = Job::new("add", json!({"a": 2, "b": 1})).expect("job");
        let text = serde_json::to_string(&job).expect("serialize");
        let back: Job = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, job);
        assert_eq!(registry().call_job(back).await, Outcome::Done);

        let mut bad = std::collections::BTreeMap::new();
        bad.insert((1, 2), "non-string key");
        let err = Job::new("add", bad).expect_err("not JSON");
        assert!(matches!(err, CallbackError::Serialize { ref handler, .. } if handler == "add"));
    }
}
