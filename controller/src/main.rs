fn main() -> std::process::ExitCode {
    eprintln!("{}", spotguard_controller::NOT_BUILT);
    std::process::ExitCode::from(2)
}
