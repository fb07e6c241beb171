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
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let username = rest_username(now + ttl, user.as_deref());
            let password = rest_password(secret.as_bytes(), &username);
            let uris: Vec<String> = match &host {
                Some(h) => vec![
                    format!("turn:{h}:3478?transport=udp"),
                    format!("turn:{h}:3478?transport=tcp"),
                    format!("turns:{h}:443?transport=tcp"),
                ],
                None => vec![],
            };
            if format.as_deref() == Some("env") {
                let Some(h) = &host else {
                    eprintln!("turnctl: --format env needs --host (the relay's public name)");
                    return ExitCode::from(2);
                };
                // prosody computes the credentials itself from TURN_CREDENTIALS.
                println!("TURN_CREDENTIALS={secret}");
                println!("TURN_HOST={h}");
                println!("TURN_PORT=3478");
                println!("TURN_TRANSPORT=udp,tcp");
                println!("TURNS_HOST={h}");
                println!("TURNS_PORT=443");
                println!("TURN_TTL={ttl}");
            } else if format.as_deref() == Some("ice") {
                println!("{}", serde_json::json!([{ "urls": uris, "username": username, "credential": password }]));
            } else if json {
                println!("{}", serde_json::json!({ "username": username, "password": password, "ttl": ttl, "uris": uris }));
            } else {
                println!("username: {username}");
                println!("password: {password}");
                for u in uris {
                    println!("uri: {u}");
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
