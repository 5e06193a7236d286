//! Which ports a scan visits, each once, with its stable `/dev/serial/by-id` name when it has one.

use std::path::{Path, PathBuf};

use super::Port;

const BY_ID: &str = "/dev/serial/by-id";
/// Device-name prefixes under /dev scanned after the by-id links, in this order.
const PREFIXES: [&str; 3] = ["ttyUSB", "ttyACM", "ttyAMA"];
/// Raspberry Pi aliases of the on-board UARTs.
const ALIASES: [&str; 2] = ["/dev/serial0", "/dev/serial1"];

/// Every `/dev/serial/by-id` link, then `/dev/ttyUSB*`, `/dev/ttyACM*`, `/dev/ttyAMA*`,
/// `/dev/serial0`, `/dev/serial1` not already covered (links are resolved, so one device is
/// scanned once, under its by-id name).
pub fn default_ports() -> Vec<Port> {
    let by_id = by_id_links(Path::new(BY_ID));
    let mut paths: Vec<PathBuf> = by_id.iter().map(|(link, _)| link.clone()).collect();
    for prefix in PREFIXES {
        paths.extend(numbered(Path::new("/dev"), prefix));
    }
    paths.extend(ALIASES.iter().map(PathBuf::from).filter(|p| p.exists()));
    dedupe(paths, &by_id)
}

/// The ports given on the command line, each once, with their by-id names.
pub fn given_ports(paths: Vec<PathBuf>) -> Vec<Port> {
    dedupe(paths, &by_id_links(Path::new(BY_ID)))
}

fn dedupe(paths: Vec<PathBuf>, by_id: &[(PathBuf, PathBuf)]) -> Vec<Port> {
    let mut seen = Vec::new();
    let mut ports = Vec::new();
    for path in paths {
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&real) {
            continue;
        }
        let stable_path = by_id.iter().find(|(_, target)| *target == real).map(|(link, _)| link.clone());
        seen.push(real);
        ports.push(Port { path, stable_path });
    }
    ports
}

/// The links in `dir`, sorted, with what each resolves to.
fn by_id_links(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut links: Vec<(PathBuf, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::canonicalize(e.path()).ok().map(|real| (e.path(), real)))
        .collect();
    links.sort();
    links
}

/// `dir/<prefix><n>` in numeric order (ttyUSB2 before ttyUSB10).
fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_resolved_so_a_device_is_scanned_once_under_its_stable_name() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let by_id = dir.path().join("by-id");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(&by_id).unwrap();
        for n in ["ttyUSB10", "ttyUSB2", "ttyUSBx", "ttyACM0"] {
            std::fs::write(dev.join(n), "").unwrap();
        }
        let link = by_id.join("usb-FTDI_A1-if00-port0");
        std::os::unix::fs::symlink(dev.join("ttyUSB10"), &link).unwrap();
        assert_eq!(numbered(&dev, "ttyUSB"), [dev.join("ttyUSB2"), dev.join("ttyUSB10")]);
        let links = by_id_links(&by_id);
        let mut paths = vec![link.clone()];
        paths.extend(numbered(&dev, "ttyUSB"));
        paths.push(dev.join("ttyUSB2"));
        let ports = dedupe(paths, &links);
        assert_eq!(
            ports,
            [
                Port { path: link.clone(), stable_path: Some(link.clone()) },
                Port { path: dev.join("ttyUSB2"), stable_path: None },
            ]
        );
        // Given by its /dev name, it is still written with its by-id name.
        let given = dedupe(vec![dev.join("ttyUSB10")], &links);
        assert_eq!(given[0].config_path(), link);
    }
}
