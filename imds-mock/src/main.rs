//! `spotguard-imds-mock`: the mock IMDS as a program (see the crate docs).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use spotguard_imds_mock::{serve, JsonStyle, MockConfig};

#[derive(Debug, Parser)]
#[command(
    name = "spotguard-imds-mock",
    version,
    about = "Local EC2 instance metadata service (IMDSv2) with a control API under /mock/"
)]
struct Args {
    /// Address to listen on. Port 0 picks a free port; the address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:1338")]
    listen: String,
    #[arg(long, default_value = "i-0123456789abcdef0")]
    instance_id: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value = "us-east-1a")]
    availability_zone: String,
    #[arg(long, default_value = "g4dn.xlarge")]
    instance_type: String,
    /// `spot` or `on-demand`.
    #[arg(long, default_value = "spot")]
    life_cycle: String,
    /// Serve metadata GETs without a token too (IMDSv1); by default IMDSv2 is required.
    #[arg(long)]
    allow_imdsv1: bool,
    /// `imds`: one-line JSON as text/plain (real IMDS); `pretty`: tab-indented
    /// application/json (the popular AWS mock).
    #[arg(long, value_enum, default_value = "imds")]
    json_style: JsonStyle,
    /// The control API's token (header `x-mock-token`); by default a random
    /// one, printed on the second line of stdout.
    #[arg(long)]
    control_token: Option<String>,
}

/// 128 random bits as hex, from the kernel.
fn random_token() -> Result<String, spotguard_common::rt::BoxError> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("cannot read /dev/urandom for the control token: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn main() -> ExitCode {
    let args = Args::parse();
    spotguard_common::rt::init_logging(false);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotguard-imds-mock: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), spotguard_common::rt::BoxError> {
    let token = match args.control_token {
        Some(t) => t,
        None => random_token()?,
    };
    let cfg = MockConfig {
        control_token: Some(token.clone()),
        instance_id: args.instance_id,
        region: args.region,
        availability_zone: args.availability_zone,
        instance_type: args.instance_type,
        life_cycle: args.life_cycle,
        require_token: !args.allow_imdsv1,
        json_style: args.json_style,
    };
    spotguard_common::rt::block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        // The first stdout line is the address, for scripts that pass port
        // 0; the second the control API's token.
        let mut out = std::io::stdout();
        writeln!(out, "listening on http://{addr}\ncontrol token: {token}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
        let shutdown = spotguard_common::rt::shutdown_signal()?;
        serve(listener, cfg, shutdown)
            .await
            .map_err(|e| format!("serving on {addr}: {e}").into())
    })
}
