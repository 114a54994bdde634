//! Running tasks on other machines (issue #20).

pub mod hosts;
