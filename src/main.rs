fn main() -> std::process::ExitCode {
    cohort::cli::main()
}
