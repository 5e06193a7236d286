//! The names of the commands the gateway knows. A leaf: the config checks `[commands] allow`
//! against it without importing the command handling in [`crate::commands`].

/// A command the gateway knows. The names are topic segments and `[commands] allow` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Close and reopen a device's port now (rate-limited per device: `commands::RESTART_INTERVAL`).
    RestartDevice,
    /// Publish a metrics message now.
    Metrics,
    /// The configuration in force, secrets redacted.
    Config,
    /// The commands allowed here.
    Help,
    /// Write a `writable` point of a Modbus slave.
    Write,
    /// Record a device's port into a capture file for a while (off unless allowed by name).
    Record,
}

impl Command {
    pub const ALL: [Self; 6] =
        [Self::RestartDevice, Self::Metrics, Self::Config, Self::Help, Self::Write, Self::Record];

    /// Whether it runs without being named in `[commands] allow`: `record` writes files on
    /// the gateway, so it must be asked for.
    pub fn on_by_default(self) -> bool {
        self != Self::Record
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestartDevice => "restart_device",
            Self::Metrics => "metrics",
            Self::Config => "config",
            Self::Help => "help",
            Self::Write => "write",
            Self::Record => "record",
        }
    }

    /// The command named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Every name, comma-separated, for messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}
