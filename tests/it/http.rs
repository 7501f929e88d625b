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
    std::fs::write(&script, "read job\necho \"did $job id=$TASKHERD_JOB_ID\"\n").expect("script");
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
    let ids: Vec<u64> = [&one, &batch]
        .iter()
        .flat_map(|answer| answer["ids"].as_array().expect("ids").clone())
        .map(|id| id.as_u64().expect("a numeric id"))
        .collect();
    assert_eq!(ids.len(), 4);
    // The ids are the queue's own: `queue list` shows them, and each
    // consumer gets its job under the id the answer gave (the queue keeps
    // each job as compact JSON).
    for (job, id) in [
        r#"did {"n":1}"#,
        r#"did {"n":2}"#,
        r#"did "three""#,
        r#"did {"n":4}"#,
    ]
    .iter()
    .zip(&ids)
    {
        herd.wait_for(&format!("{job} id={id}"));
    }
    let status = wait_status(address, "4 jobs done", |s| {
        group(s, "jobs")["queue"]["done"] == 4
    });
    assert_eq!(group(&status, "jobs")["queue"]["dead"], 0);

    // A job for later is in the queue under the id the answer gave, and
    // `taskherd queue add` takes the next ids.
    let later = post(
        address,
        "/v1/queues/jobs/jobs",
        Some(TOKEN),
        r#"{"job": "later", "options": {"delay": "1h"}}"#,
    );
    assert_eq!(later.status, 202, "{}", later.text());
    let later_id = later.json()["ids"][0].as_u64().expect("id");
    assert!(later_id > ids[3], "{later_id} after {ids:?}");
    let queue = dir.path().join("jobs.queue");
    let added = crate::support::queue_ok(&[
        std::ffi::OsStr::new("add"),
        queue.as_os_str(),
        std::ffi::OsStr::new("--delay"),
        std::ffi::OsStr::new("1h"),
        std::ffi::OsStr::new("\"cli\""),
    ]);
    let cli_id = later_id + 1;
    assert!(
        added.contains(&format!("added 1 job (id {cli_id})")),
        "{added}"
    );
    // Both wait in the journal (once the feeder took them in) under those
    // ids.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed: serde_json::Value = serde_json::from_str(&crate::support::queue_on(
            &["list", "--json", "--jobs"],
            &queue,
        ))
        .expect("JSON");
        let listed: Vec<(u64, String)> = listed["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|job| (job["id"].as_u64().expect("id"), job["job"].to_string()))
            .collect();
        if listed.contains(&(later_id, "\"later\"".into()))
            && listed.contains(&(cli_id, "\"cli\"".into()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

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
    // Two crashes, to count: the policy restarts both web instances (an
    // operator's restart would not count).
    let before = status_json(&herd);
    for instance in group(&before, "web")["instances"].as_array().expect("web") {
        let pid = instance["pid"].as_i64().expect("running");
        // SAFETY: kill(2) on a pid this test's herd runs.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    }
    wait_status(address, "web restarted by its policy", |s| {
        group(s, "web")["instances"].as_array().is_some_and(|all| {
            all.iter()
                .all(|i| i["state"] == "running" && i["restarts"] == 1)
        })
    });
    // An operator's restart, not to count.
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
    // And a status that shows its new process; an operator's restart is
    // not counted among its restarts (those are the policy's).
    let new_pid = started["pid"].clone();
    let status = events.wait_for(deadline, "status after the restart", |name, data| {
        name == "status"
            && group(data, "web")["instances"]
                .as_array()
                .is_some_and(|all| all.iter().any(|i| i["id"] == id && i["pid"] == new_pid))
    });
    let listed = group(&status, "web")["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["id"] == id).cloned())
        .expect("listed");
    assert_eq!(listed["restarts"], 0, "{status}");
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

/// Whether the server closed `stream` within `within`: a read ends (end
/// of stream, or reset) instead of timing out.
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read as _;
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // An answer (408, say) before the close.
            Ok(_) => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_and_trickling_connections_are_closed_and_others_are_served() {
    use std::io::Write as _;
    use std::net::TcpStream;
    let mut herd = herd_at(
        "bind = \"127.0.0.1:0\"\nheader_timeout = \"1s\"\nmax_connections = 3",
        None,
    );
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));

    // A client that connects and sends nothing is closed after the header
    // timeout (bounded generously for a busy machine); meanwhile others
    // are served.
    let mut silent = TcpStream::connect(address).expect("connect");
    assert_eq!(get(address, "/v1/status", None).status, 200);
    assert!(
        closed_within(&mut silent, Duration::from_secs(20)),
        "a silent connection stayed open"
    );

    // Headers trickled a byte at a time never complete: closed too, long
    // before the trickle would end.
    let mut slow = TcpStream::connect(address).expect("connect");
    slow.write_all(b"GET /v1/status HTTP/1.1\r\n")
        .expect("request line");
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..400 {
        if slow.write_all(b"X").is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut slow, Duration::from_millis(100)) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a trickling client was served for {:?}",
        started.elapsed()
    );

    // As many silent clients as the cap: the next one waits in the backlog
    // until the timeout frees a place, then is served.
    let hogs: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(address).expect("connect"))
        .collect();
    assert_eq!(get(address, "/v1/status", None).status, 200);
    drop(hogs);
    assert_eq!(get(address, "/metrics", None).status, 200);
    stop(&mut herd);
}

/// Each job's (number, id) from the `queue_worker`s' `done` lines.
fn done_with_ids(herd: &Herd) -> BTreeMap<u64, u64> {
    let mut done = BTreeMap::new();
    for line in &herd.seen {
        // "... done <n> #<id> attempt <a>"
        let Some((_, rest)) = line.rsplit_once("] done ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let job = words.next().and_then(|w| w.parse::<u64>().ok());
        let id = words
            .next()
            .and_then(|w| w.strip_prefix('#'))
            .and_then(|w| w.parse::<u64>().ok());
        if let (Some(job), Some(id)) = (job, id) {
            done.insert(job, id);
        }
    }
    done
}

#[test]
fn jobs_posted_for_a_jetstream_group_are_published_and_run_under_their_sequence() {
    let test = "jobs_posted_for_a_jetstream_group_are_published_and_run_under_their_sequence";
    let Some(server) = crate::support::nats::NatsServer::start(test) else {
        return;
    };
    let worker = crate::support::worker_bin().with_file_name("queue_worker");
    let mut herd = Herd::new(&format!(
        r#"
[http]
bind = "127.0.0.1:0"
token = "{TOKEN}"

[nats]
servers = ["{url}"]

[[group]]
name = "jobs"
command = "{worker}"
params = {{ ids = true }}

[group.queue]
backend = "nats"

[group.local]
instances = 2
"#,
        url = server.url(),
        worker = worker.display(),
    ));
    herd.start_with(&["--log-filter", "debug"]);
    let address = address_in(&herd.wait_for("http: listening on"));
    herd.wait_for("JetStream stream TASKHERD_JOBS ready");

    // Plain jobs, two with the same unique key (the second is a duplicate:
    // it gets the first one's sequence), one delayed.
    let posted = post(
        address,
        "/v1/queues/jobs/jobs",
        Some(TOKEN),
        r#"[1, 2, {"job": 3, "options": {"unique": "k"}},
            {"job": 4, "options": {"unique": "k"}},
            {"job": 5, "options": {"delay": "1s"}}]"#,
    );
    assert_eq!(posted.status, 202, "{}", posted.text());
    let ids: Vec<u64> = posted.json()["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_u64().expect("a sequence"))
        .collect();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(
        ids[3], ids[2],
        "a duplicate answers the first one's sequence"
    );
    let mut distinct = vec![ids[0], ids[1], ids[2], ids[4]];
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{ids:?}");

    // Each job is done by a consumer under the sequence the answer gave.
    let want: BTreeMap<u64, u64> = [(1, ids[0]), (2, ids[1]), (3, ids[2]), (5, ids[4])].into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = done_with_ids(&herd);
        if want.iter().all(|(job, id)| done.get(job) == Some(id)) {
            assert!(!done.contains_key(&4), "a duplicate ran: {done:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "done {done:?}, want {want:?}; seen:\n{}",
            herd.seen.join("\n")
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }

    // An option JetStream does not take is refused, naming the job.
    let refused = post(
        address,
        "/v1/queues/jobs/jobs",
        Some(TOKEN),
        r#"[7, {"job": 8, "options": {"priority": 3}}]"#,
    );
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.error().starts_with("job 2: option \"priority\""),
        "{}",
        refused.text()
    );
    stop(&mut herd);
    drop(server);
}

/// The value of the sample `name{labels}` in a `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/metrics` (bounded) until `series` has `value`.
fn wait_sample(address: SocketAddr, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = get(address, "/metrics", None).text();
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never {value}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A herd with an HTTP interface and one `sleep 1000` on each of `hosts`
/// (remote), `ssh_extra` in its `[ssh]`.
fn far_sleepers(world: &crate::support::sshd::SshWorld, ssh_extra: &str, hosts: &[&str]) -> String {
    format!(
        r#"{header}{ssh_extra}
[http]
bind = "127.0.0.1:0"

[[group]]
name = "far"
command = "sleep"
args = ["1000"]
[[group.remote]]
hosts = ["{hosts}"]
instances = 1
"#,
        header = crate::remote::header(world, ""),
        hosts = hosts.join("\", \""),
    )
}

/// `host`'s entry in `GET /v1/hosts`.
fn host_entry(address: SocketAddr, host: &str) -> serde_json::Value {
    let hosts = get(address, "/v1/hosts", None).json();
    hosts["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["host"] == host)
        .cloned()
        .unwrap_or_else(|| panic!("{host} not listed: {hosts}"))
}

#[test]
fn a_remote_host_shows_up_then_down_when_its_sshd_goes() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let mut host = world.add_host();
    let alias = host.alias().to_string();
    let mut herd = Herd::new(&far_sleepers(&world, "", &[&alias]));
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));
    herd.wait_for(&format!("host {alias}: connected"));
    let up = wait_sample(
        address,
        &format!("taskherd_host_state{{host=\"{alias}\",state=\"up\"}}"),
        1.0,
    );
    assert_eq!(
        sample(&up, &format!("taskherd_host_up{{host=\"{alias}\"}}")),
        Some(1.0)
    );
    assert_eq!(
        sample(&up, "taskherd_host_state{host=\"localhost\",state=\"up\"}"),
        None,
        "no instance runs on the master's host"
    );

    // The host goes away (its sshd and everything it started, the agent
    // too): its connection is down, with why, until it can come back.
    host.stop();
    let down = wait_sample(
        address,
        &format!("taskherd_host_state{{host=\"{alias}\",state=\"down\"}}"),
        1.0,
    );
    assert_eq!(
        sample(&down, &format!("taskherd_host_up{{host=\"{alias}\"}}")),
        Some(0.0)
    );
    let entry = host_entry(address, &alias);
    assert!(
        matches!(entry["state"].as_str(), Some("down" | "connecting")),
        "{entry}"
    );
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
}

#[test]
fn a_host_given_up_stays_down_with_why() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let alias = host.alias().to_string();
    // Nothing listens on port 1 of this loopback address.
    let hosts = [alias.as_str(), "root@127.0.0.1:1"];
    let mut herd = Herd::new(&far_sleepers(&world, "give_up_after = 1", &hosts));
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));
    herd.wait_for("given up after 1 lost connection in a row");
    herd.wait_for(&format!("host {alias}: connected"));
    let down = wait_sample(
        address,
        "taskherd_host_state{host=\"127.0.0.1:1\",state=\"down\"}",
        1.0,
    );
    assert_eq!(
        sample(
            &down,
            &format!("taskherd_host_state{{host=\"{alias}\",state=\"up\"}}")
        ),
        Some(1.0)
    );
    let entry = host_entry(address, "127.0.0.1:1");
    assert_eq!(entry["state"], "down", "{entry}");
    let problem = entry["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("given up after 1 lost connection"),
        "{entry}"
    );
    herd.signal(libc::SIGTERM);
    // Its instance ended lost: the run failed.
    assert_eq!(herd.wait_exit().code(), Some(1));
    crate::remote::assert_host_clean(&host);
}

#[test]
fn jobs_answered_202_survive_a_master_killed_and_run_under_their_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let done = dir.path().join("done.log");
    let script = dir.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "read job\necho \"$job $TASKHERD_JOB_ID\" >> {:?}\n",
            done.display().to_string()
        ),
    )
    .expect("script");
    let mut herd = Herd::new(&format!(
        r#"
[http]
bind = "127.0.0.1:0"
token = "{TOKEN}"

[[group]]
name = "jobs"
command = "sh"
args = [{script:?}]
stop_grace = "2s"
[group.feeder]
file = "{queue}"
[group.consumer]
run = "exec"
[group.local]
instances = 2
"#,
        script = script.display().to_string(),
        queue = dir.path().join("jobs.queue").display(),
    ));
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));
    // 200 jobs in 50 requests; the master is SIGKILLed right after the
    // last answer, most of them not run yet.
    let mut want: BTreeMap<u64, String> = BTreeMap::new();
    for request in 0..50u64 {
        let jobs: Vec<String> = (0..4)
            .map(|k| format!("{{\"n\":{}}}", request * 4 + k))
            .collect();
        let answer = post(
            address,
            "/v1/queues/jobs/jobs",
            Some(TOKEN),
            &format!("[{}]", jobs.join(",")),
        );
        assert_eq!(answer.status, 202, "{}", answer.text());
        let ids = answer.json()["ids"].as_array().cloned().expect("ids");
        for (id, job) in ids.iter().zip(jobs) {
            let id = id.as_u64().expect("id");
            assert!(want.insert(id, job).is_none(), "id {id} given twice");
        }
    }
    herd.signal(libc::SIGKILL);
    herd.wait_exit();

    // A new master on the same config runs every job, each under the id
    // its answer gave (at least once: a job running when the master died
    // may run again).
    herd.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&done).unwrap_or_default();
        let mut seen: BTreeMap<u64, String> = BTreeMap::new();
        for line in text.lines() {
            let (job, id) = line.rsplit_once(' ').expect("job and id");
            let id: u64 = id.parse().expect("an id");
            if let Some(before) = seen.insert(id, job.to_string()) {
                assert_eq!(before, job, "id {id} ran two different jobs");
            }
        }
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} jobs done; missing {:?}",
            seen.len(),
            want.len(),
            want.keys()
                .filter(|id| !seen.contains_key(id))
                .take(10)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(&mut herd);
}
