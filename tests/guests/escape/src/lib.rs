//! A guest that reaches for the filesystem, the environment and the network
//! through Rust's std (so through `wasi:filesystem`, `wasi:cli/environment`
//! and `wasi:sockets`). The host links those interfaces with nothing behind
//! them: every attempt must be an error the guest sees, never access.

use conflux_sdk::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Escape {}

#[entity]
impl Escape {
    pub fn read_file(&self, path: String) -> Result<String, Error> {
        std::fs::read_to_string(path).map_err(Error::failed)
    }

    pub fn write_file(&self, path: String) -> Result<(), Error> {
        std::fs::write(path, b"escaped").map_err(Error::failed)
    }

    pub fn list_dir(&self, path: String) -> Result<Vec<String>, Error> {
        let entries = std::fs::read_dir(path).map_err(Error::failed)?;
        Ok(entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
    }

    pub fn env(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }

    pub fn connect(&self, addr: String) -> Result<(), Error> {
        std::net::TcpStream::connect(addr).map(drop).map_err(Error::failed)
    }

    pub fn resolve(&self, host: String) -> Result<Vec<String>, Error> {
        use std::net::ToSocketAddrs;
        let addrs = (host.as_str(), 80).to_socket_addrs().map_err(Error::failed)?;
        Ok(addrs.map(|a| a.to_string()).collect())
    }

    pub fn bind(&self, addr: String) -> Result<(), Error> {
        std::net::TcpListener::bind(addr).map(drop).map_err(Error::failed)
    }
}
