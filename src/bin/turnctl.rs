//! turnctl: the operator tool for turnd.

use std::process::ExitCode;

use clap::Parser;

use turnd::auth::{rest_password, rest_username};
use turnd::cli::turnctl::{AdminArgs, CertCmd, Cli, Cmd};
use turnd::config::Seconds;

/// Connects to the admin API the arguments name.
fn connect(args: &AdminArgs) -> Result<turnd::ctl::admin::Admin, String> {
    if let Some(file) = &args.config {
        // The file alone: nothing it names is read or created here.
        let cfg = turnd::config::load_reading(Some(file), &turnd::config::Overrides::default(), turnd::config::Reads::FileOnly).map_err(|e| format!("{}: {e:#}", file.display()))?;
        let addr = cfg.metrics_listen.ok_or_else(|| format!("{}: metrics.listen is off, so turnd serves no admin API", file.display()))?;
        let token = cfg.admin_token_file.ok_or_else(|| format!("{}: the admin API is off (admin.enabled = false)", file.display()))?;
        return turnd::ctl::admin::Admin::from_token_file(addr, &token);
    }
    let path = args.token_file.clone().unwrap_or_else(turnd::config::default_admin_token_path);
    turnd::ctl::admin::Admin::from_token_file(args.admin, &path)
}

/// Runs an admin call and prints its result; exit 1 on failure.
fn admin_call(
    args: &AdminArgs,
    json: bool,
    call: impl FnOnce(&turnd::ctl::admin::Admin) -> Result<serde_json::Value, turnd::ctl::admin::AdminError>,
    render: impl FnOnce(&serde_json::Value) -> String,
) -> ExitCode {
    let admin = match connect(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("turnctl: {e}");
            return ExitCode::from(2);
        }
    };
    match call(&admin) {
        Ok(v) => {
            if json {
                println!("{v}");
            } else {
                print!("{}", render(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `turnctl drain` did.
fn render_drained(v: &serde_json::Value) -> String {
    let to: Vec<&str> = v["alternates"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
    let already = if v["was"] == "draining" { " (it was already)" } else { "" };
    let dest = if to.is_empty() {
        "new allocations are refused (508: no [[drain.alternate]] configured), so browsers use the other relays they were given".to_owned()
    } else {
        format!("new allocations go to {} (300 Try Alternate)", to.join(", "))
    };
    format!(
        "draining{already}: {dest}; /readyz answers 503; {} allocation(s) keep relaying until they end. \
         turnd keeps running: stop it when they have ended (turnctl status), or `turnctl resume`.\n",
        v["allocations"]
    )
}

/// `turnctl drain --wait`: polls the status until no allocation is left
/// (exit 0) or `limit` passes (exit 1), printing the count as it falls.
fn wait_drained(args: &AdminArgs, limit: std::time::Duration) -> ExitCode {
    let admin = match connect(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("turnctl: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = std::time::Instant::now() + limit;
    let mut last = None;
    loop {
        match admin.status() {
            Ok(v) => {
                let n = v["allocations"].as_u64().unwrap_or(0);
                if last != Some(n) {
                    println!("{n} allocation(s) left");
                    last = Some(n);
                }
                if n == 0 {
                    println!("drained: no allocation left");
                    return ExitCode::SUCCESS;
                }
                if v["draining"] != true {
                    eprintln!("turnctl: turnd is no longer draining (turnctl resume?)");
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("turnctl: {e}");
                return ExitCode::FAILURE;
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            eprintln!("turnctl: {} allocation(s) still running after --wait {}s", last.unwrap_or(0), limit.as_secs());
            return ExitCode::FAILURE;
        }
        std::thread::sleep(left.min(std::time::Duration::from_secs(1)));
    }
}

fn read_first_secret(path: &std::path::Path) -> Result<String, String> {
    turnd::config::SecretFile::read(path).map(|f| f.first())
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Credentials { secret, secret_file, user, ttl, host, json, format } => {
            let secret = match (secret, secret_file) {
                (Some(s), _) => s,
                (None, Some(f)) => match read_first_secret(&f) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("turnctl: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => unreachable!("clap requires one of them"),
            };
            let ttl = match ttl.parse::<Seconds>() {
                Ok(t) if t.0 > 0 => t.0,
                _ => {
                    eprintln!("turnctl: --ttl: `{ttl}` is not a positive duration (e.g. 3600, 30m, 24h)");
                    return ExitCode::from(2);
                }
            };
            if let Some(h) = host.iter().find(|h| !turnd::ctl::jitsi::valid_host(h)) {
                eprintln!("turnctl: --host: `{h}` is not a host name or IP address (an IPv6 address in brackets, no port)");
                return ExitCode::from(2);
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let username = rest_username(now + ttl, user.as_deref());
            let password = rest_password(secret.as_bytes(), &username);
            let uris = turnd::ctl::jitsi::uris(&host);
            match format.as_deref() {
                Some(f @ ("env" | "prosody")) if host.is_empty() => {
                    eprintln!("turnctl: --format {f} needs --host (the relay's public name; repeat it for several relays)");
                    return ExitCode::from(2);
                }
                // prosody computes the credentials itself from the secret.
                Some("env") => print!("{}", turnd::ctl::jitsi::env(&secret, &host, ttl)),
                Some("prosody") => print!("{}", turnd::ctl::jitsi::prosody(&secret, &host, ttl)),
                Some("ice") => println!("{}", turnd::ctl::jitsi::ice(&host, &username, &password)),
                _ if json => println!("{}", serde_json::json!({ "username": username, "password": password, "ttl": ttl, "uris": uris })),
                _ => {
                    println!("username: {username}");
                    println!("password: {password}");
                    for u in uris {
                        println!("uri: {u}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Secret => {
            println!("{}", turnd::config::generate_secret());
            ExitCode::SUCCESS
        }
        Cmd::Status { admin, json } => admin_call(&admin, json, |a| a.status(), turnd::ctl::admin::render_status),
        Cmd::Sessions { admin, json } => admin_call(&admin, json, |a| a.sessions(), turnd::ctl::admin::render_sessions),
        Cmd::Disconnect { admin, user, client, relayed } => {
            // A selector that can match nothing is a mistake, not "0 disconnected".
            if let Some(c) = client.as_deref().filter(|c| c.parse::<std::net::IpAddr>().is_err() && c.parse::<std::net::SocketAddr>().is_err()) {
                eprintln!("turnctl: --client: `{c}` is not IP or IP:PORT (e.g. 198.51.100.7 or 198.51.100.7:40000, [2001:db8::7]:40000)");
                return ExitCode::from(2);
            }
            if let Some(r) = relayed.as_deref().filter(|r| r.parse::<std::net::SocketAddr>().is_err()) {
                eprintln!("turnctl: --relayed: `{r}` is not IP:PORT (e.g. 203.0.113.10:50000)");
                return ExitCode::from(2);
            }
            let sel = match (user, client, relayed) {
                (Some(u), _, _) => serde_json::json!({ "user": u }),
                (_, Some(c), _) => serde_json::json!({ "client": c }),
                (_, _, Some(r)) => serde_json::json!({ "relayed": r }),
                _ => unreachable!("clap requires one of them"),
            };
            admin_call(&admin, false, |a| a.disconnect(&sel), |v| format!("disconnected {} allocation(s)\n", v["disconnected"]))
        }
        Cmd::Drain { admin, wait } => {
            let wait = match wait.as_deref().map(|w| w.parse::<Seconds>()) {
                None => None,
                Some(Ok(t)) if t.0 > 0 => Some(std::time::Duration::from_secs(t.0)),
                Some(_) => {
                    eprintln!("turnctl: --wait: `{}` is not a positive duration (e.g. 600, 30m, 6h)", wait.unwrap_or_default());
                    return ExitCode::from(2);
                }
            };
            let rc = admin_call(&admin, false, |a| a.drain(), render_drained);
            match wait {
                Some(limit) if rc == ExitCode::SUCCESS => wait_drained(&admin, limit),
                _ => rc,
            }
        }
        Cmd::Resume { admin } => admin_call(&admin, false, |a| a.resume(), |v| match v["was"].as_str() {
            Some("draining") => "resumed: new allocations are taken again\n".to_owned(),
            _ => "was not draining: new allocations are taken\n".to_owned(),
        }),
        Cmd::Reload { admin } => admin_call(&admin, false, |a| a.reload(), |v| format!("{}\n", v["message"].as_str().unwrap_or("reloaded"))),
        Cmd::Upgrade { admin, binary } => admin_call(&admin, false, |a| a.upgrade(binary.as_deref()), |v| {
            format!(
                "upgraded: process {} serves the listeners and {} UDP allocations ({} ms); process {} keeps its TCP/TLS connections until they end\n",
                v["pid"], v["allocations"], v["elapsed_ms"], v["previous_pid"]
            )
        }),
        Cmd::Cert { cmd: CertCmd::Renew { admin } } => {
            admin_call(&admin, false, |a| a.renew_cert(), |v| format!("renewed: {}\n", v["message"].as_str().unwrap_or("done")))
        }
        Cmd::Check(args) => ExitCode::from(turnd::ctl::check::main(args)),
    }
}
