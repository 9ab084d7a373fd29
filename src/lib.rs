pub fn _x(){}

#[cfg(any(test, feature = "testing"))]
pub mod testing;
