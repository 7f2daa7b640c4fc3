fn main() -> std::process::ExitCode {
    eprintln!("spotguard-controller: command line not wired yet");
    std::process::ExitCode::from(2)
}
