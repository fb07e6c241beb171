//! Debian's squid as the only way out of a test network: started in a
//! network namespace with the stock access rules of /etc/squid/squid.conf
//! (CONNECT only to port 443: `http_access deny CONNECT !SSL_ports`) plus
//! one line allowing clients from 198.18.0.0/15. Include it from a test file
//! that also has `mod common;` and `#[path = "common/netns.rs"] mod netns;`,
//! with `#[path = "common/squid.rs"] mod squid;`. Needs the `squid` package
//! (test.sh installs it).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use crate::netns::NetNs;

const STOCK_CONF: &str = "/etc/squid/squid.conf";

/// squid in the foreground (`-N`) in a namespace, with a config file and
/// logs in a temporary directory; killed (with its process group) and the
/// directory removed on drop.
pub struct Squid {
    child: Child,
    dir: PathBuf,
}

impl Squid {
    /// Starts squid in `ns` listening on `listen`, allowing clients from
    /// 198.18.0.0/15 under Debian's stock rules. Ready when its cache.log
    /// says it accepts connections (bounded: 15 s).
    pub fn start(ns: &NetNs, listen: SocketAddr) -> Squid {
        assert!(
            std::path::Path::new("/usr/sbin/squid").exists() && std::path::Path::new(STOCK_CONF).exists(),
            "squid is missing: this test needs Debian's `squid` package (test.sh installs it: apt-get install -y squid)"
        );
        let stock = std::fs::read_to_string(STOCK_CONF).expect("read the stock squid.conf");
        let rules: Vec<&str> = stock
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| l.starts_with("acl ") || l.starts_with("http_access "))
            .collect();
        // The rule this network is about, as Debian ships it.
        assert!(rules.contains(&"acl SSL_ports port 443"), "{STOCK_CONF} has no `acl SSL_ports port 443`:\n{rules:#?}");
        assert!(
            rules.contains(&"http_access deny CONNECT !SSL_ports"),
            "{STOCK_CONF} has no `http_access deny CONNECT !SSL_ports`:\n{rules:#?}"
        );
        let dir = common::temp_dir("squid");
        // squid drops to the `proxy` user: it must write its logs here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let mut conf = String::new();
        for r in rules.iter().filter(|r| r.starts_with("acl ")) {
            conf += &format!("{r}\n");
        }
        conf += "acl testnet src 198.18.0.0/15\n";
        for r in rules.iter().filter(|r| r.starts_with("http_access ") && **r != "http_access deny all") {
            conf += &format!("{r}\n");
        }
        // Where Debian's file says "INSERT YOUR OWN RULE(S) HERE".
        conf += "http_access allow testnet\nhttp_access deny all\n";
        conf += &format!(
            "http_port {listen}\n\
             pid_filename none\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             netdb_filename none\n\
             pinger_enable off\n\
             logfile_rotate 0\n\
             cache deny all\n\
             dns_nameservers 127.0.0.1\n\
             shutdown_lifetime 0 seconds\n",
            d = dir.display()
        );
        let conf_path = dir.join("squid.conf");
        std::fs::write(&conf_path, &conf).unwrap();
        let out = std::fs::File::create(dir.join("squid.out")).unwrap();
        let child = ns
            .command("squid")
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start squid");
        let mut squid = Squid { child, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !squid.cache_log().contains("Accepting HTTP Socket connections at") {
            if let Ok(Some(st)) = squid.child.try_wait() {
                panic!("squid exited ({st}):\n{}\n{}", squid.cache_log(), squid.output());
            }
            assert!(Instant::now() < deadline, "squid not ready within 15 s:\n{}\n{}", squid.cache_log(), squid.output());
            std::thread::sleep(Duration::from_millis(50));
        }
        squid
    }

    pub fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cache.log")).unwrap_or_default()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("squid.out")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits (bounded: 10 s) for an access.log line containing all of
    /// `needles`. squid logs a CONNECT tunnel when it closes.
    pub fn wait_access(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.access_log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "squid's access.log has no line with {needles:?} within 10 s:\n{}",
                self.access_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        common::kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
