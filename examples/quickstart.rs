fn main() {
    let _ = tokenbroker::testing::ManualClock::starting_now();
    println!("ok");
}
