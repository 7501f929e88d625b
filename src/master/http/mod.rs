//! The master's HTTP interface (`[http]`): the webhook that enqueues jobs,
//! the herd's status, its event stream, group actions, Prometheus metrics
//! and the dashboard.
//!
//! It is one more way in for operators, beside the [`Herd`] handle and
//! the control socket, and it goes the same way: group actions are the
//! run loop's requests, answered by it; the status is the core's. It
//! never holds the core's lock across an await, and what it asks is
//! bounded: at most 16 actions wait at once, jobs go to a bounded intake
//! per queue, each event-stream client has a bounded channel and loses the
//! oldest events when it falls behind.
//!
//! - `auth`: the bearer token (constant-time compare) and who may do what;
//! - `enqueue`: where a group's jobs go (the durable file queue's inbox,
//!   written by one task per queue that group-commits concurrent requests);
//! - `events`: the server-sent event stream;
//! - `metrics`: `/metrics` in the Prometheus text format;
//! - `dashboard.html`: the page at `/`, embedded in the binary.
//!
//! The README's section "HTTP, metrics and dashboard" documents the
//! endpoints for users.

mod auth;
mod enqueue;
mod events;
mod metrics;

pub(crate) use metrics::EventTally;

use self::auth::{Access, Token};
use self::enqueue::Intakes;
use super::herd::Herd;
use super::request::{Answer, HerdError, Request};
use crate::config::{HttpSpec, HttpToken, HTTP_TOKEN_ENV};
use crate::log::LogSink;
use crate::master::links::HostLinks;
use crate::protocol::control::Target;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Group actions waiting for the run loop's answer at once, at most; more
/// are refused with 503 (the run loop is never flooded).
pub(crate) const ACTIONS_AT_ONCE: usize = 16;

/// Longest wait for an action's answer; after it the answer is 202 (the
/// action goes on).
const ACTION_WAIT: Duration = Duration::from_secs(30);

/// Longest wait, once the master stops serving, for open requests to end.
pub(crate) const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The dashboard: one page, its style and script inline.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Why the HTTP interface cannot start (the master refuses to start then).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// `http.token_file` cannot be read.
    #[error("http.token_file {}: cannot read it", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("http: the token from {from} is empty")]
    EmptyToken {
        /// Where it came from.
        from: String,
    },
    /// An address beyond loopback without a token.
    #[error(
        "http.bind {bind} is reachable beyond this machine and no token is set: \
         set http.token, http.token_file or {HTTP_TOKEN_ENV}"
    )]
    NoToken {
        /// The address.
        bind: SocketAddr,
    },
    /// The address cannot be bound.
    #[error("http.bind {bind}: cannot listen")]
    Bind {
        /// The address.
        bind: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The HTTP interface, bound and ready to serve.
#[derive(Debug)]
pub(crate) struct HttpServer {
    listener: std::net::TcpListener,
    token: Option<Token>,
    max_body: usize,
    limits: ConnectionLimits,
}

impl HttpServer {
    /// Reads the token and binds `spec.bind` (relative paths from
    /// `base_dir`).
    ///
    /// # Errors
    /// An unreadable or empty token, an address beyond loopback without a
    /// token, or an address that cannot be bound.
    pub(crate) fn bind(spec: &HttpSpec, base_dir: &Path) -> Result<HttpServer, HttpError> {
        let token = match &spec.token {
            HttpToken::Text(text) => Some(Token::new(text, "http.token")?),
            HttpToken::File(path) => {
                let path = base_dir.join(path);
                let text =
                    std::fs::read_to_string(&path).map_err(|source| HttpError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                let first = text.lines().next().unwrap_or_default();
                Some(Token::new(first, &path.display().to_string())?)
            }
            HttpToken::Environment => match std::env::var(HTTP_TOKEN_ENV) {
                Ok(text) if !text.trim().is_empty() => Some(Token::new(&text, HTTP_TOKEN_ENV)?),
                _ => None,
            },
        };
        if token.is_none() && !spec.bind.ip().is_loopback() {
            return Err(HttpError::NoToken { bind: spec.bind });
        }
        let bind_err = |source| HttpError::Bind {
            bind: spec.bind,
            source,
        };
        let listener = std::net::TcpListener::bind(spec.bind).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(HttpServer {
            listener,
            token,
            max_body: usize::try_from(spec.max_body).unwrap_or(usize::MAX),
            limits: ConnectionLimits {
                header_timeout: spec.header_timeout,
                max_connections: usize::try_from(spec.max_connections).unwrap_or(usize::MAX),
            },
        })
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` is cancelled, then lets open requests end
    /// (event streams end at once).
    pub(crate) async fn serve(
        self,
        herd: Herd,
        sink: LogSink,
        links: HostLinks,
        stop: CancellationToken,
    ) {
        let HttpServer {
            listener,
            token,
            max_body,
            limits,
        } = self;
        let address = listener.local_addr().ok();
        let loopback = address.is_some_and(|a| a.ip().is_loopback());
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(cause = %err, "cannot serve HTTP");
                return;
            }
        };
        let shared = Arc::new(Shared {
            intakes: Intakes::new(herd.board().clone()),
            herd,
            sink,
            access: Access { token, loopback },
            actions: Arc::new(Semaphore::new(ACTIONS_AT_ONCE)),
            stop: stop.clone(),
            links,
        });
        let app = router(shared, max_body);
        serve_connections(listener, app, &limits, &stop).await;
    }
}

/// Accepts connections until `stop`, at most `limits.max_connections`
/// at once (more wait in the listen backlog), each closed when a
/// request's headers do not come within `limits.header_timeout` (a client
/// that sends nothing, trickles its headers or idles between requests);
/// then lets open requests end, for [`SHUTDOWN_WAIT`] at most.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    stop: &CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    let mut failing = false;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, say: not a reason to stop.
                    if !failing {
                        tracing::warn!(cause = %err, "http: cannot accept a connection");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        failing = false;
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_timeout = limits.header_timeout;
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(cause = %err, "http: connection closed");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_WAIT, conn).await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, tracker.wait()).await;
}

/// The connection-level limits of `[http]`.
#[derive(Debug, Clone)]
struct ConnectionLimits {
    header_timeout: Duration,
    max_connections: usize,
}

/// What every request shares.
struct Shared {
    herd: Herd,
    sink: LogSink,
    access: Access,
    /// Bounds the actions waiting for the run loop.
    actions: Arc<Semaphore>,
    /// Where jobs go.
    intakes: Intakes,
    /// The master stops serving: event streams end.
    stop: CancellationToken,
    /// Each remote host's connection.
    links: HostLinks,
}

type AppState = State<Arc<Shared>>;

fn router(shared: Arc<Shared>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/hosts", get(hosts))
        .route("/v1/events", get(events))
        .route("/v1/stop", post(stop))
        .route("/v1/groups/{group}/{action}", post(action))
        .route("/v1/queues/{group}/jobs", post(enqueue))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<HerdError> for ApiError {
    fn from(err: HerdError) -> Self {
        let status = match &err {
            HerdError::UnknownGroup { .. } => StatusCode::NOT_FOUND,
            HerdError::Stopping | HerdError::Ending | HerdError::StoppedMidway => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::CONFLICT,
        };
        ApiError::new(status, err.to_string())
    }
}

/// A body, or the JSON error of why not (too large: 413).
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the body is larger than http.max_body".to_string()
        } else {
            rejection.body_text()
        };
        ApiError::new(status, message)
    })
}

async fn dashboard() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(DASHBOARD)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint: see GET /v1/status, GET /v1/events, GET /metrics, \
         POST /v1/queues/{group}/jobs, POST /v1/groups/{group}/{suspend|resume|restart|start|stop}, \
         POST /v1/stop",
    )
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here: reads are GET, jobs and actions POST"),
    )
}

/// A path's parts, or the JSON error of why not.
fn path_of<T>(path: Result<UrlPath<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|UrlPath(parts)| parts)
        .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
}

async fn status(State(shared): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    shared.access.read(&headers)?;
    Ok(Json(shared.herd.status()).into_response())
}

/// `GET /v1/hosts`: each host's connection (`connecting`, `up`, `down`,
/// with since when and what took it down).
async fn hosts(State(shared): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    shared.access.read(&headers)?;
    Ok(Json(events::hosts_json(&shared.herd, &shared.links)).into_response())
}

async fn metrics(State(shared): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    shared.access.read(&headers)?;
    let text = metrics::render(&shared.herd, &shared.sink, &shared.intakes, &shared.links);
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

async fn events(State(shared): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    shared.access.read(&headers)?;
    Ok(events::stream(
        &shared.herd,
        &shared.sink,
        &shared.links,
        shared.stop.clone(),
    )
    .into_response())
}

/// `?wait=false`: answer 202 at once instead of waiting for the outcome.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

async fn action(
    State(shared): AppState,
    path: Result<UrlPath<(String, String)>, PathRejection>,
    query: Result<Query<ActionQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    shared.access.write(&headers)?;
    let (group, action) = path_of(path)?;
    let Query(ActionQuery { wait }) =
        query.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    // `{group}` is a group, or one instance of it (`web:2`) for start,
    // stop and restart.
    let Ok(target) = group.parse::<Target>();
    let whole_group = |verb: &str| {
        if target.id.is_some() {
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{verb} acts on a whole group, not on {target}"),
            ))
        } else {
            Ok(target.group.clone())
        }
    };
    let request = match action.as_str() {
        "suspend" => Request::Suspend {
            group: whole_group("suspend")?,
        },
        "resume" => Request::Resume {
            group: whole_group("resume")?,
        },
        "restart" => Request::Restart {
            target: target.clone(),
        },
        "start" => Request::Start {
            target: target.clone(),
        },
        "stop" => Request::StopInstances {
            target: target.clone(),
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}: expected suspend, resume, restart, start or stop"),
            ))
        }
    };
    // Known before anything is asked, so that an unknown group is a 404
    // even with `wait=false`.
    shared.herd.board().lock().known_group(&target.group)?;
    let Ok(permit) = shared.actions.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{ACTIONS_AT_ONCE} actions are under way already: try again later"),
        ));
    };
    let asked = {
        let herd = shared.herd.clone();
        tokio::spawn(async move {
            // Held until the run loop answers, even if the caller left.
            let _permit = permit;
            herd.answer(request).await
        })
    };
    if !wait {
        return Ok(accepted(format!("{action} asked")));
    }
    match tokio::time::timeout(ACTION_WAIT, asked).await {
        Ok(Ok(Ok(answer))) => {
            Ok(Json(serde_json::json!({ "message": message_of(answer) })).into_response())
        }
        Ok(Ok(Err(err))) => Err(err.into()),
        Ok(Err(_)) => Err(HerdError::Ending.into()),
        Err(_) => Ok(accepted(format!(
            "{action} under way (not done within {}s)",
            ACTION_WAIT.as_secs()
        ))),
    }
}

fn message_of(answer: Answer) -> String {
    answer.into_message()
}

fn accepted(message: String) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "message": message })),
    )
        .into_response()
}

/// `POST /v1/stop`, body `{"kill": true}` optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(default)]
    kill: bool,
}

async fn stop(
    State(shared): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    shared.access.write(&headers)?;
    let body = body_of(body)?;
    let StopBody { kill } = if body.iter().all(u8::is_ascii_whitespace) {
        StopBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"kill\": bool}}: {err}"),
            )
        })?
    };
    let herd = shared.herd.clone();
    // The answer comes once every instance has ended: not waited for here.
    tokio::spawn(async move {
        let reason = if kill {
            "kill requested over HTTP"
        } else {
            "stop requested over HTTP"
        };
        let _ = herd
            .answer(Request::Stop {
                kill,
                reason: reason.to_string(),
            })
            .await;
    });
    Ok(accepted(
        if kill { "killing" } else { "stopping" }.to_string(),
    ))
}

async fn enqueue(
    State(shared): AppState,
    path: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    shared.access.write(&headers)?;
    let group = path_of(path)?;
    let body = body_of(body)?;
    let ids = shared.intakes.enqueue(&group, &body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "group": group, "accepted": ids.len(), "ids": ids })),
    )
        .into_response())
}
