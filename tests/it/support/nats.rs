//! Real `nats-server -js` processes for the JetStream tests: on loopback,
//! on ephemeral ports, each with its own store directory; one node or a
//! 3-node cluster. Every server started is killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

/// The `nats-server` binary, if installed (Debian's package; scripts/test
/// installs it). `None` after printing why the test `name` skips.
pub fn nats_server_bin(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let bin = Path::new(dir).join("nats-server");
        if bin.is_file() {
            return Some(bin);
        }
    }
    eprintln!(
        "{name}: skipped: no nats-server (apt-get install nats-server, as scripts/test does)"
    );
    None
}

/// A free port on 127.0.0.1 (the kernel's pick; a server that then fails
/// to bind it is started again on another).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// One `nats-server -js` on 127.0.0.1.
pub struct NatsServer {
    bin: PathBuf,
    /// Its config file, store dir and log.
    dir: PathBuf,
    /// Keeps the directory alive (for a single node).
    _temp: Option<tempfile::TempDir>,
    pub port: u16,
    /// The cluster's route port (clustered nodes only).
    cluster_port: Option<u16>,
    /// Extra config text (authorization, cluster).
    extra: String,
    name: String,
    child: Option<Child>,
}

impl NatsServer {
    /// A single node with JetStream, or `None` (the test skips) when
    /// nats-server is not installed.
    pub fn start(test: &str) -> Option<NatsServer> {
        NatsServer::start_with(test, "")
    }

    /// A single node whose config also has `extra` (such as an
    /// `authorization { ... }` block).
    pub fn start_with(test: &str, extra: &str) -> Option<NatsServer> {
        let bin = nats_server_bin(test)?;
        let temp = tempfile::tempdir().expect("temp dir for nats-server");
        let mut server = NatsServer {
            bin,
            dir: temp.path().to_path_buf(),
            _temp: Some(temp),
            port: 0,
            cluster_port: None,
            extra: extra.to_string(),
            name: "n1".into(),
            child: None,
        };
        server.launch_new_port();
        Some(server)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn config_text(&self, port: u16) -> String {
        format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: {store:?} }}\n{extra}\n",
            name = self.name,
            store = self.dir.join("store").display().to_string(),
            extra = self.extra,
        )
    }

    /// Starts on a new port (retrying a port someone took meanwhile).
    fn launch_new_port(&mut self) {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            match self.launch(port) {
                Ok(()) => return,
                Err(why) => failures.push(format!("port {port}: {why}")),
            }
        }
        panic!("could not start nats-server:\n{}", failures.join("\n"));
    }

    /// Starts the server on `port` and waits until it answers a client
    /// (its INFO line) and says it is ready.
    fn launch(&mut self, port: u16) -> Result<(), String> {
        let config = self.dir.join(format!("{}.conf", self.name));
        std::fs::write(&config, self.config_text(port)).map_err(|err| err.to_string())?;
        let log = self.dir.join(format!("{}.log", self.name));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|err| err.to_string())?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|err| format!("cannot run {}: {err}", self.bin.display()))?;
        self.child = Some(child);
        self.port = port;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("exited ({status}): {}", self.log()));
                }
            }
            if self.answers() && self.log().contains("Server is ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("not ready within {WAIT:?}: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a client connection gets the server's INFO line.
    fn answers(&self) -> bool {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.dir.join(format!("{}.log", self.name))) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// SIGKILLs the server (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running nats-server");
        let port = self.port;
        let mut last = String::new();
        // The port was just freed: retry a moment if it is still held.
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.launch(port) {
                Ok(()) => return,
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nats-server did not start again on {port}: {last}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-node JetStream cluster on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _temp: tempfile::TempDir,
}

impl NatsCluster {
    /// Three nodes, routed to each other, each with its own store; waits
    /// until JetStream has a meta leader. `None` when nats-server is
    /// missing.
    pub fn start(test: &str) -> Option<NatsCluster> {
        let bin = nats_server_bin(test)?;
        let temp = tempfile::tempdir().expect("temp dir for the cluster");
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let dir = temp.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&dir).expect("node dir");
            let extra = format!(
                "cluster {{ name: th, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}",
                routes.join(", ")
            );
            let mut node = NatsServer {
                bin: bin.clone(),
                dir,
                _temp: None,
                port: 0,
                cluster_port: Some(*cluster_port),
                extra,
                name: format!("n{}", i + 1),
                child: None,
            };
            // A clustered node is ready once it listens; JetStream's meta
            // leader comes once a majority is up (checked below).
            node.launch_clustered();
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, _temp: temp };
        cluster.wait_for_leader();
        Some(cluster)
    }

    /// The client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    fn wait_for_leader(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self
                .nodes
                .iter()
                .any(|node| node.log().contains("JetStream cluster new metadata leader"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no JetStream meta leader in the cluster: {}",
            self.nodes[0].log()
        );
    }
}

impl NatsServer {
    /// Starts a clustered node: it is up once it answers clients.
    fn launch_clustered(&mut self) {
        let _ = self.cluster_port;
        for _ in 0..5 {
            let port = free_port();
            let config = self.dir.join(format!("{}.conf", self.name));
            std::fs::write(&config, self.config_text(port)).expect("write node config");
            let log = self.dir.join(format!("{}.log", self.name));
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("node log");
            let child = Command::new(&self.bin)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("run nats-server");
            self.child = Some(child);
            self.port = port;
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if let Some(child) = &mut self.child {
                    if let Ok(Some(_)) = child.try_wait() {
                        self.child = None;
                        break;
                    }
                }
                if self.answers() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.kill();
        }
        panic!("clustered nats-server did not start: {}", self.log());
    }
}
