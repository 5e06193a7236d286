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
}

impl Command {
    pub const ALL: [Self; 5] = [Self::RestartDevice, Self::Metrics, Self::Config, Self::Help, Self::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestartDevice => "restart_device",
            Self::Metrics => "metrics",
            Self::Config => "config",
            Self::Help => "help",
            Self::Write => "write",
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
