//! The command lines of `turnd` and `turnctl` (clap), here rather than in
//! src/bin so that `turnd-docgen` can render man pages and shell completions
//! from the same definitions the programs parse.

/// `turnd`'s command line.
pub mod turnd {
    use std::path::PathBuf;

    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "turnd", version, about = "TURN/STUN relay (RFC 8489, RFC 8656) with TURN REST API credentials")]
    pub struct Args {
        /// Configuration file (TOML). Without one, turnd serves UDP and TCP on 0.0.0.0:3478 with a generated secret.
        #[arg(short, long, value_name = "FILE")]
        pub config: Option<PathBuf>,
        /// Listener as [udp|tcp|tls://]IP:PORT, repeatable; replaces the [[listen]] entries.
        #[arg(long, value_name = "ADDR")]
        pub listen: Vec<String>,
        /// Realm (overrides `realm`).
        #[arg(long)]
        pub realm: Option<String>,
        /// IPv4 address relay sockets bind to (overrides `relay.ip`).
        #[arg(long, value_name = "IP")]
        pub relay_ip: Option<String>,
        /// Public IPv4 address advertised behind 1:1 NAT (overrides `relay.external_ip`).
        #[arg(long, value_name = "IP")]
        pub external_ip: Option<String>,
        /// Relay port range LOW-HIGH (overrides `relay.ports`).
        #[arg(long, value_name = "LOW-HIGH")]
        pub ports: Option<String>,
        /// File with the shared secret(s), one per line (overrides `auth.secret_file`).
        #[arg(long, value_name = "FILE")]
        pub secret_file: Option<PathBuf>,
        /// CIDR or IP:PORT to allow as a peer despite the deny list, repeatable (added to `peers.allow`).
        #[arg(long, value_name = "CIDR|IP:PORT")]
        pub allow_peer: Vec<String>,
        /// Threads relaying, one shard each (overrides `threads`; a restart, not a reload, changes it).
        #[arg(long, value_name = "N")]
        pub threads: Option<String>,
        /// Log level or filter (overrides `log.level`).
        #[arg(long, value_name = "LEVEL")]
        pub log_level: Option<String>,
        /// Log format: text or json (overrides `log.format`).
        #[arg(long, value_name = "FORMAT")]
        pub log_format: Option<String>,
        /// Check everything a start checks, short of serving, and exit: the file, the certificate
        /// and key, that listen and relay addresses are on this host and their ports free (a port held by a
        /// running turnd is fine). Exit status 0 when a start would succeed, 2 otherwise.
        #[arg(long)]
        pub check_config: bool,
        /// With --check-config: check the file alone, for a file meant for another host
        /// (no certificate, address or port checks; the secret and admin token files it names
        /// are neither read nor created).
        #[arg(long, requires = "check_config")]
        pub file_only: bool,
    }

    /// The clap definition, for man pages and completions.
    pub fn command() -> clap::Command {
        <Args as clap::CommandFactory>::command()
    }
}

/// `turnctl`'s command line.
pub mod turnctl {
    use std::path::PathBuf;

    use clap::{Parser, Subcommand};

    #[derive(Parser)]
    #[command(name = "turnctl", version, about = "Operator tool for the turnd TURN relay")]
    pub struct Cli {
        #[command(subcommand)]
        pub cmd: Cmd,
    }

    #[derive(Subcommand)]
    pub enum Cmd {
        /// Print time-limited TURN credentials (TURN REST API, as prosody's mod_external_services computes them).
        Credentials {
            /// The shared secret. Other users of this host can read it in the process list while
            /// turnctl runs: prefer --secret-file.
            #[arg(long, conflicts_with = "secret_file", required_unless_present = "secret_file")]
            secret: Option<String>,
            /// File holding the shared secret(s); the first one signs.
            #[arg(long, value_name = "FILE")]
            secret_file: Option<PathBuf>,
            /// User part appended to the expiry (EXPIRY:USER).
            #[arg(long)]
            user: Option<String>,
            /// Validity, in seconds or with a unit (30m, 24h).
            #[arg(long, default_value = "24h")]
            ttl: String,
            /// TURN host to put in the URIs (turn:HOST:3478, turns:HOST:443). Repeat it (or
            /// separate with commas) for several relays sharing the secret, nearest first.
            #[arg(long, value_delimiter = ',')]
            host: Vec<String>,
            /// Print the TURN REST API JSON response.
            #[arg(long, conflicts_with = "format")]
            json: bool,
            /// Output to paste elsewhere: `ice` (an RTCIceServer JSON array for a browser, one
            /// entry per relay), `env` (docker-jitsi-meet .env lines for the prosody container)
            /// or `prosody` (prosody's external_service_secret and external_services, as Lua);
            /// `env` and `prosody` need --host.
            #[arg(long, value_parser = ["ice", "env", "prosody"])]
            format: Option<String>,
        },
        /// Generate a strong random shared secret.
        Secret,
        /// Show the running relay: version, uptime, whether it drains, listeners, allocations, relay ports.
        Status {
            #[command(flatten)]
            admin: AdminArgs,
            #[arg(long)]
            json: bool,
        },
        /// List allocations: user, client, transport, relayed address, peers, bytes, age.
        Sessions {
            #[command(flatten)]
            admin: AdminArgs,
            #[arg(long)]
            json: bool,
        },
        /// End allocations of a user (USER or EXPIRY:USER), a client (IP or IP:PORT) or a relayed address.
        Disconnect {
            #[command(flatten)]
            admin: AdminArgs,
            #[arg(long, group = "which", required = true)]
            user: Option<String>,
            #[arg(long, group = "which")]
            client: Option<String>,
            #[arg(long, group = "which")]
            relayed: Option<String>,
        },
        /// Reload turnd's configuration, secrets and certificates (like SIGHUP); reports a refusal.
        Reload {
            #[command(flatten)]
            admin: AdminArgs,
        },
        /// Take this relay out of service without ending a call: new allocations go to the
        /// siblings in [[drain.alternate]] (300 Try Alternate; 508 without one) and /readyz
        /// answers 503, while existing allocations keep relaying. turnd keeps running until you
        /// stop it; `turnctl resume` takes new allocations again.
        Drain {
            #[command(flatten)]
            admin: AdminArgs,
            /// Then wait until no allocation is left (or this long passes: exit status 1),
            /// printing how many are left as they end; e.g. 6h.
            #[arg(long, value_name = "DURATION")]
            wait: Option<String>,
        },
        /// Take new allocations again after `turnctl drain` (not after SIGTERM).
        Resume {
            #[command(flatten)]
            admin: AdminArgs,
        },
        /// Replace the running turnd with a new binary without dropping calls: the new process takes over the listening sockets and every UDP allocation; TCP/TLS connections finish on the old one.
        Upgrade {
            #[command(flatten)]
            admin: AdminArgs,
            /// The new binary (default: the path the running turnd was started from, where a package upgrade puts the new one).
            #[arg(long, value_name = "PATH")]
            binary: Option<PathBuf>,
        },
        /// The TLS certificate: `turnctl cert renew` makes turnd's ACME client renew it now.
        Cert {
            #[command(subcommand)]
            cmd: CertCmd,
        },
        /// From a participant's network: STUN, allocations and a relay round trip over UDP, TCP and TLS, the certificate, and what it means.
        Check(crate::ctl::check::CheckArgs),
    }

    #[derive(Subcommand)]
    pub enum CertCmd {
        /// Renew the certificate now ([tls.acme]); waits for the CA's answer and reports it.
        Renew {
            #[command(flatten)]
            admin: AdminArgs,
        },
    }

    /// How to reach turnd's admin API (on its metrics listener).
    #[derive(clap::Args)]
    pub struct AdminArgs {
        /// turnd's metrics/admin listener (metrics.listen).
        #[arg(long, default_value = "127.0.0.1:9641", value_name = "IP:PORT")]
        pub admin: std::net::SocketAddr,
        /// File holding the admin token (admin.token_file). Default: turnd's state directory.
        #[arg(long, value_name = "FILE")]
        pub token_file: Option<PathBuf>,
        /// Take the admin address (metrics.listen) and token file (admin.token_file) from turnd's config file.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["admin", "token_file"])]
        pub config: Option<PathBuf>,
    }

    /// The clap definition, for man pages and completions.
    pub fn command() -> clap::Command {
        <Cli as clap::CommandFactory>::command()
    }
}
