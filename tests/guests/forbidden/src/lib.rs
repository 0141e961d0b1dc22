//! A guest that reaches for the filesystem and the network. Uploading it must
//! fail, naming its `wasi:filesystem` and `wasi:sockets` imports.

use conflux_sdk::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Forbidden {}

#[entity]
impl Forbidden {
    pub fn read(&self, path: String) -> Result<String, Error> {
        std::fs::read_to_string(path).map_err(Error::failed)
    }

    pub fn connect(&self, addr: String) -> Result<(), Error> {
        std::net::TcpStream::connect(addr).map(drop).map_err(Error::failed)
    }
}
