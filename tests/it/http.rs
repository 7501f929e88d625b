//! The master's HTTP interface against a real master (`taskherd run`):
//! jobs posted to the webhook are run by consumers, the token rules, bad
//! requests, group actions, `/metrics` against `status --json`, and the
//! event stream.

use crate::support::http::{address_in, get, post, request, EventStream};
use crate::support::Herd;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TOKEN: &str = "0123-s3cret-token";

/// A herd with `[http]` (a free port on loopback, `http` lines added), a
/// queue group `jobs` (built-in file queue, exec consumers that echo
/// each job) and a plain group `web`.
fn herd(dir: &std::path::Path, http: &str) -> Herd {
    let script = dir.join("job.sh");
    std::fs::write(&script, "read job\necho \"did $job\"\n").expect("script");
    Herd::new(&format!(
        r#"
[http]
bind = "127.0.0.1:0"
{http}

[[group]]
name = "web"
command = "sleep"
args = ["300"]
stop_grace = "2s"
[group.local]
instances = 2

[[group]]
name = "jobs"
command = "sh"
args = [{script:?}]
stop_grace = "2s"
[group.feeder]
file = "{queue}"
[group.consumer]
run = "exec"
[group.queue]
progress_every = "100ms"
[group.local]
instances = 2
"#,
        script = script.display().to_string(),
        queue = dir.join("jobs.queue").display(),
    ))
}

/// Starts `herd`; returns the HTTP address it listens on.
fn start(herd: &mut Herd) -> SocketAddr {
    herd.start();
    address_in(&herd.wait_for("http: listening on"))
}

fn stop(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
}

/// `taskherd status --json`.
fn status_json(herd: &Herd) -> serde_json::Value {
    let out = herd.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json")
}

/// Polls `GET /v1/status` (bounded) until `done` says so; returns it.
fn wait_status(
    address: SocketAddr,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = get(address, "/v1/status", None).json();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not in time; status {status:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every instance runs.
fn wait_running(address: SocketAddr) {
    wait_status(address, "every instance running", |status| {
        let instances: Vec<serde_json::Value> = status["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["instances"].as_array().cloned().unwrap_or_default())
            .collect();
        !instances.is_empty() && instances.iter().all(|i| i["state"] == "running")
    });
}

fn group<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name} in {status}"))
}

#[test]
fn jobs_posted_to_the_webhook_are_run_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut herd = herd(dir.path(), &format!("token = {TOKEN:?}\nmax_body = 1024"));
    let address = start(&mut herd);
    wait_running(address);

    // One job, then three at once: 202 with an id each, once durable.
    let one = post(address, "/v1/queues/jobs/jobs", Some(TOKEN), r#"{"n": 1}"#);
    assert_eq!(one.status, 202, "{}", one.text());
    let one = one.json();
    assert_eq!(
        (one["group"].as_str(), one["accepted"].as_u64()),
        (Some("jobs"), Some(1))
    );
    let batch = post(
        address,
        "/v1/queues/jobs/jobs",
        Some(TOKEN),
        r#"[{"n": 2}, "three", {"job": {"n": 4}, "options": {"priority": 9}}]"#,
    );
    assert_eq!(batch.status, 202, "{}", batch.text());
    let batch = batch.json();
    let mut ids: Vec<String> = [&one, &batch]
        .iter()
        .flat_map(|answer| answer["ids"].as_array().expect("ids").clone())
        .map(|id| id.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 4);
    ids.dedup();
    assert_eq!(ids.len(), 4, "distinct ids");
    // The queue keeps each job as compact JSON.
    for job in [
        r#"did {"n":1}"#,
        r#"did {"n":2}"#,
        r#"did "three""#,
        r#"did {"n":4}"#,
    ] {
        herd.wait_for(job);
    }
    let status = wait_status(address, "4 jobs done", |s| {
        group(s, "jobs")["queue"]["done"] == 4
    });
    assert_eq!(group(&status, "jobs")["queue"]["dead"], 0);

    // The token: missing, wrong, another scheme.
    let jobs = "/v1/queues/jobs/jobs";
    let missing = post(address, jobs, None, "1");
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert!(
        missing.error().contains("Authorization: Bearer"),
        "{}",
        missing.text()
    );
    assert_eq!(
        post(address, jobs, Some("0123-s3cret-tokeN"), "1").status,
        401
    );
    assert_eq!(
        post(address, jobs, Some("0123"), "1").error(),
        "wrong token"
    );
    let basic = request(address, "POST", jobs, None, b"1");
    assert_eq!(basic.status, 401);

    // Bad requests: 4xx with a JSON error, nothing added.
    let malformed = post(address, jobs, Some(TOKEN), r#"{"n": "#);
    assert_eq!(malformed.status, 400);
    assert!(
        malformed.error().starts_with("the body is not JSON"),
        "{}",
        malformed.text()
    );
    let options = post(
        address,
        jobs,
        Some(TOKEN),
        r#"[1, {"job": 2, "options": {"delay": -1}}]"#,
    );
    assert_eq!(options.status, 400);
    assert!(
        options.error().starts_with("job 2: option \"delay\""),
        "{}",
        options.text()
    );
    let big = format!("[{}]", vec!["\"0123456789\""; 300].join(","));
    let oversized = post(address, jobs, Some(TOKEN), &big);
    assert_eq!(oversized.status, 413, "{}", oversized.text());
    assert_eq!(oversized.error(), "the body is larger than http.max_body");
    let unknown = post(address, "/v1/queues/nope/jobs", Some(TOKEN), "1");
    assert_eq!(
        (unknown.status, unknown.error()),
        (404, "no group named \"nope\"".to_string())
    );
    let plain = post(address, "/v1/queues/web/jobs", Some(TOKEN), "1");
    assert_eq!(plain.status, 409);
    assert_eq!(
        plain.error(),
        "group web takes no jobs over HTTP: it is not a queue group"
    );
    let method = get(address, jobs, None);
    assert_eq!(method.status, 405);
    assert!(
        method.error().starts_with("GET is not allowed here"),
        "{}",
        method.text()
    );
    let nowhere = get(address, "/v2/anything", None);
    assert_eq!(nowhere.status, 404);
    assert!(
        nowhere.error().starts_with("no such endpoint"),
        "{}",
        nowhere.text()
    );

    // The master kept going: the same four jobs, done once each; a new
    // one still goes through.
    let more = post(address, jobs, Some(TOKEN), "5");
    assert_eq!(more.status, 202, "{}", more.text());
    herd.wait_for("did 5");
    let status = wait_status(address, "5 jobs done", |s| {
        group(s, "jobs")["queue"]["done"] == 5
    });
    assert_eq!(herd.lines_with("did ").len(), 5, "each job run once");
    let web = group(&status, "web");
    assert_eq!(web["instances"].as_array().map(Vec::len), Some(2));
    stop(&mut herd);
}

#[test]
fn group_actions_need_the_token_and_go_through_the_run_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut herd = herd(dir.path(), &format!("token = {TOKEN:?}"));
    let address = start(&mut herd);
    wait_running(address);

    // Reads are open on loopback; writes are not.
    assert_eq!(get(address, "/v1/status", None).status, 200);
    assert_eq!(
        post(address, "/v1/groups/web/suspend", None, "").status,
        401
    );
    let suspended = post(address, "/v1/groups/web/suspend", Some(TOKEN), "");
    assert_eq!(suspended.status, 200, "{}", suspended.text());
    assert!(
        suspended.json()["message"]
            .as_str()
            .expect("message")
            .contains("suspended"),
        "{}",
        suspended.text()
    );
    // What `taskherd status` says too.
    let status = status_json(&herd);
    assert_eq!(group(&status, "web")["suspended"], true);
    assert!(group(&status, "web")["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .all(|i| i["state"] == "suspended"));
    let resumed = post(address, "/v1/groups/web/resume", Some(TOKEN), "");
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert_eq!(group(&status_json(&herd), "web")["suspended"], false);

    // One instance: stopped, then started again, as `taskherd stop web:2`.
    let stopped = post(address, "/v1/groups/web:2/stop", Some(TOKEN), "");
    assert_eq!(stopped.status, 200, "{}", stopped.text());
    let instance_state = |status: &serde_json::Value, id: u64| {
        group(status, "web")["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["group_id"] == id)
            .map(|i| i["state"].clone())
    };
    let status = status_json(&herd);
    assert_eq!(
        instance_state(&status, 2),
        Some("stopped".into()),
        "{status}"
    );
    assert_eq!(
        instance_state(&status, 1),
        Some("running".into()),
        "{status}"
    );
    let started = post(address, "/v1/groups/web:2/start", Some(TOKEN), "");
    assert_eq!(started.status, 200, "{}", started.text());
    assert_eq!(
        instance_state(&status_json(&herd), 2),
        Some("running".into())
    );
    let one = post(address, "/v1/groups/web:2/suspend", Some(TOKEN), "");
    assert_eq!(one.status, 400, "{}", one.text());

    let unknown = post(address, "/v1/groups/nope/restart", Some(TOKEN), "");
    assert_eq!(
        (unknown.status, unknown.error()),
        (404, "no group named \"nope\"".to_string())
    );
    let action = post(address, "/v1/groups/web/explode", Some(TOKEN), "");
    assert_eq!(action.status, 404);
    assert!(action
        .error()
        .contains("expected suspend, resume, restart, start or stop"));

    // Stop over HTTP: the herd stops cleanly.
    assert_eq!(post(address, "/v1/stop", None, "").status, 401);
    assert_eq!(
        post(address, "/v1/stop", Some(TOKEN), "{\"kill\": 3}").status,
        400
    );
    let stopping = post(address, "/v1/stop", Some(TOKEN), "");
    assert_eq!(stopping.status, 202, "{}", stopping.text());
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.wait_for("stop requested over HTTP");
    herd.assert_no_leftovers();
}

#[test]
fn without_a_token_writes_are_refused_and_beyond_loopback_one_is_required() {
    let dir = tempfile::tempdir().expect("temp dir");
    // On loopback without a token: reads only.
    let mut herd = herd(dir.path(), "");
    herd.env_remove("TASKHERD_HTTP_TOKEN");
    let address = start(&mut herd);
    assert_eq!(get(address, "/v1/status", None).status, 200);
    let refused = post(address, "/v1/queues/jobs/jobs", Some("guess"), "1");
    assert_eq!(refused.status, 403);
    assert!(
        refused.error().starts_with("no token is configured"),
        "{}",
        refused.text()
    );
    stop(&mut herd);

    // Beyond loopback without a token: the master refuses to start.
    let mut open = herd_at("bind = \"0.0.0.0:0\"", None);
    open.env_remove("TASKHERD_HTTP_TOKEN");
    open.start();
    let status = open.wait_exit();
    assert!(!status.success());
    open.wait_for("http.bind");
    open.wait_for("reachable beyond this machine: set http.token");
    assert!(open.marked_processes().is_empty());

    // An empty token file: refused too, saying so.
    let mut empty = herd_at("bind = \"0.0.0.0:0\"\ntoken_file = \"token\"", Some("\n"));
    empty.start();
    assert!(!empty.wait_exit().success());
    empty.wait_for("is empty");

    // With a token file: everything needs the token, reads too.
    let mut public = herd_at(
        "bind = \"0.0.0.0:0\"\ntoken_file = \"token\"",
        Some(&format!("{TOKEN}\n")),
    );
    public.start();
    let line = public.wait_for("http: listening on");
    let port = address_in(&line).port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(get(address, "/v1/status", None).status, 401);
    assert_eq!(get(address, "/metrics", Some("nope")).status, 401);
    assert_eq!(get(address, "/v1/status", Some(TOKEN)).status, 200);
    assert_eq!(get(address, "/metrics", Some(TOKEN)).status, 200);
    stop(&mut public);
}

/// A herd with one plain group and `http` lines in `[http]`; `token`
/// written to the file `token` next to its config.
fn herd_at(http: &str, token: Option<&str>) -> Herd {
    let herd = Herd::new(&format!(
        "[http]\n{http}\n\n[[group]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"300\"]\n[group.local]\ninstances = 1\n"
    ));
    if let Some(token) = token {
        let dir = herd.config.parent().expect("dir");
        std::fs::write(dir.join("token"), token).expect("token file");
    }
    herd
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_the_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut herd = herd(dir.path(), &format!("token = {TOKEN:?}"));
    let address = start(&mut herd);
    wait_running(address);
    let added = post(address, "/v1/queues/jobs/jobs", Some(TOKEN), "[1, 2, 3]");
    assert_eq!(added.status, 202, "{}", added.text());
    wait_status(address, "3 jobs done", |s| {
        group(s, "jobs")["queue"]["done"] == 3
    });
    // A restart, to count.
    let restarted = post(address, "/v1/groups/web/restart", Some(TOKEN), "");
    assert_eq!(restarted.status, 200, "{}", restarted.text());

    let scrape = get(address, "/metrics", None);
    assert_eq!(scrape.status, 200);
    assert!(scrape
        .header("content-type")
        .expect("type")
        .starts_with("text/plain; version=0.0.4"));
    let text = scrape.text();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let status = status_json(&herd);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let sample = parsed
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
        match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    // Instances by group and state, restarts: as `status --json` says.
    for g in status["groups"].as_array().expect("groups") {
        let name = g["name"].as_str().expect("name");
        let mut states: BTreeMap<&str, f64> = BTreeMap::new();
        let mut restarts = 0.0;
        for i in g["instances"].as_array().expect("instances") {
            *states
                .entry(i["state"].as_str().expect("state"))
                .or_default() += 1.0;
            restarts += i["restarts"].as_f64().expect("restarts");
        }
        for state in ["running", "pending", "backoff", "suspended", "failed"] {
            let expected = states.get(state).copied().unwrap_or(0.0);
            assert_eq!(
                value("taskherd_instances", &[("group", name), ("state", state)]),
                expected,
                "{name} {state}"
            );
        }
        assert_eq!(
            value("taskherd_instance_restarts_total", &[("group", name)]),
            restarts
        );
    }
    assert_eq!(
        value("taskherd_instance_restarts_total", &[("group", "web")]),
        2.0
    );
    let queue = &group(&status, "jobs")["queue"];
    assert_eq!(
        value("taskherd_queue_jobs_done_total", &[("group", "jobs")]),
        3.0
    );
    assert_eq!(queue["done"], 3);
    // How long they took: a histogram of the 3.
    assert_eq!(
        value("taskherd_job_duration_seconds_count", &[("group", "jobs")]),
        3.0
    );
    assert!(value("taskherd_job_duration_seconds_sum", &[("group", "jobs")]) > 0.0);
    let buckets = parsed
        .samples
        .iter()
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets)
                if s.metric == "taskherd_job_duration_seconds"
                    && s.labels.get("group") == Some("jobs") =>
            {
                Some(buckets.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no job duration histogram in\n{text}"));
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "{buckets:?}"
    );
    let all = buckets.last().expect("a +Inf bucket");
    assert!(
        all.less_than.is_infinite() && all.count == 3.0,
        "{buckets:?}"
    );
    assert_eq!(
        value(
            "taskherd_queue_jobs",
            &[("group", "jobs"), ("state", "pending")]
        ),
        queue["pending"].as_f64().expect("pending")
    );
    assert_eq!(
        value("taskherd_http_jobs_accepted_total", &[("group", "jobs")]),
        3.0
    );
    // The restart ended two processes by a signal (sleep ignores nothing).
    assert!(
        value(
            "taskherd_instance_exits_total",
            &[("group", "web"), ("cause", "signal")]
        ) >= 2.0
    );
    assert!(
        value("taskherd_log_lines_total", &[]) >= 3.0,
        "the jobs' output"
    );
    assert_eq!(value("taskherd_host_up", &[("host", "localhost")]), 1.0);
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    for sample in &parsed.samples {
        assert!(
            sample.metric.starts_with("taskherd_") || sample.metric.starts_with("process_"),
            "{}",
            sample.metric
        );
    }
    stop(&mut herd);
}

#[test]
fn the_event_stream_delivers_a_restart_as_it_happens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut herd = herd(dir.path(), &format!("token = {TOKEN:?}"));
    let address = start(&mut herd);
    wait_running(address);
    let mut events = EventStream::open(address, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    // First the whole status.
    let first = events.wait_for(deadline, "status", |name, _| name == "status");
    let web = group(&first, "web");
    let old_pid = web["instances"][0]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("running: {first}"));
    let id = web["instances"][0]["id"].as_u64().expect("id");

    let restarted = post(
        address,
        "/v1/groups/web/restart?wait=false",
        Some(TOKEN),
        "",
    );
    assert_eq!(restarted.status, 202, "{}", restarted.text());
    let is = |data: &serde_json::Value, event: &str| {
        data["event"] == event && data["id"] == id && data["group"] == "web"
    };
    events.wait_for(deadline, "stopping", |name, data| {
        name == "instance" && is(data, "stopping")
    });
    let exited = events.wait_for(deadline, "exited", |name, data| {
        name == "instance" && is(data, "exited")
    });
    assert!(
        exited["how"].as_str().expect("how").contains("SIGTERM"),
        "{exited}"
    );
    let started = events.wait_for(deadline, "started", |name, data| {
        name == "instance" && is(data, "started")
    });
    assert_ne!(started["pid"].as_u64(), Some(old_pid), "a new process");
    // And a status that shows it restarted.
    events.wait_for(deadline, "status after the restart", |name, data| {
        name == "status"
            && group(data, "web")["instances"]
                .as_array()
                .is_some_and(|all| all.iter().any(|i| i["id"] == id && i["restarts"] == 1))
    });
    // Queue counts come as `queue` events.
    let added = post(address, "/v1/queues/jobs/jobs", Some(TOKEN), "7");
    assert_eq!(added.status, 202);
    events.wait_for(deadline, "queue", |name, data| {
        name == "queue" && data["group"] == "jobs" && data["progress"]["done"] == 1
    });
    events.wait_for(deadline, "stats", |name, data| {
        name == "stats" && data["jobs_done"] == 1
    });
    stop(&mut herd);
}

#[test]
fn the_webhook_example_runs_as_documented() {
    // examples/webhook.toml with its script, on a free port (the example's
    // 8470 may be taken), the token from the environment as its comment says.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let text = std::fs::read_to_string(examples.join("webhook.toml")).expect("read example");
    assert!(text.contains("bind = \"127.0.0.1:8470\""), "{text}");
    assert!(
        text.contains("curl -H 'Authorization: Bearer s3cret'"),
        "{text}"
    );
    let mut herd = Herd::new(&text.replace("127.0.0.1:8470", "127.0.0.1:0"));
    let dir = herd.config.parent().expect("dir").to_path_buf();
    std::fs::create_dir(dir.join("exec")).expect("exec dir");
    let script = dir.join("exec/thumbnail.sh");
    std::fs::copy(examples.join("exec/thumbnail.sh"), &script).expect("copy script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    herd.env_set("TASKHERD_HTTP_TOKEN", "s3cret");
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));
    let added = post(
        address,
        "/v1/queues/thumbs/jobs",
        Some("s3cret"),
        r#"{"image": "a.png"}"#,
    );
    assert_eq!(added.status, 202, "{}", added.text());
    herd.wait_for(r#"handled {"image":"a.png"} (job 1, attempt 1)"#);
    stop(&mut herd);
}
