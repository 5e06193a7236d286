//! Modbus RTU, sans-IO: what a slave's points are ([`point`]), which requests read them
//! ([`plan`]), and the bytes of a transaction ([`rtu`]: requests built and replies checked
//! with rmodbus). The bus task in `device::bus` owns the port and the clock and drives these.

pub mod plan;
pub mod point;
pub mod rtu;
pub mod schedule;

pub use self::plan::{plan, Request};
pub use self::point::{Point, PointType, Table, WordOrder};
pub use self::rtu::{Fault, Transaction};
pub use self::schedule::Schedule;
