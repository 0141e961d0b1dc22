//! Checks that an upload is a component implementing the `entity` world and
//! importing nothing beyond it but the inert WASI interfaces. Pure checks over
//! bytes and component types; no I/O.

use crate::runtime::{ENTITY_IMPORTS, HANDLER_EXPORT, INERT_WASI_INTERFACES};
use wasmtime::component::Component;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("upload is empty")]
    Empty,
    #[error("not a WebAssembly binary (no \\0asm header); upload the .wasm file built for wasm32-wasip2")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; build the entity with `cargo build --release --target wasm32-wasip2`"
    )]
    CoreModule,
    #[error("unsupported WebAssembly binary version/layer {0:02x?}")]
    UnknownLayer([u8; 4]),
    #[error("not a valid component (truncated or corrupt?): {0}")]
    Compile(String),
    #[error("component imports interfaces the host does not allow: {}", .0.join(", "))]
    ForbiddenImports(Vec<String>),
    #[error(
        "component does not export `{HANDLER_EXPORT}`; is it built against the conflux:entity world (conflux-sdk)?"
    )]
    MissingHandler,
    #[error("component does not fit the entity world: {0}")]
    Link(String),
}

/// Cheap checks on the first bytes, for clear errors before compiling.
pub fn check_header(bytes: &[u8]) -> Result<(), ValidationError> {
    if bytes.is_empty() {
        return Err(ValidationError::Empty);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(ValidationError::NotWasm);
    }
    let layer: [u8; 4] = bytes[4..8].try_into().expect("length checked");
    match layer {
        [1, 0, 0, 0] => Err(ValidationError::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        other => Err(ValidationError::UnknownLayer(other)),
    }
}

/// Refuses a component whose top-level imports go beyond the allow-list,
/// naming each, from its bytes alone: a 12–18 MB interpreter component that
/// imports `wasi:http` is refused in milliseconds instead of after a compile
/// of tens of seconds. Nested core modules and components import from their
/// parent, not from the host, so only the outermost import section counts.
/// [`check_world`] checks the compiled component's types again.
pub fn check_declared_imports(bytes: &[u8]) -> Result<(), ValidationError> {
    use wasmparser::Payload;
    let mut depth = 0usize;
    let mut forbidden = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| ValidationError::Compile(e.to_string()))? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) if depth == 0 => break,
            Payload::End(_) => depth -= 1,
            Payload::ComponentImportSection(imports) if depth == 0 => {
                for import in imports {
                    let name = import.map_err(|e| ValidationError::Compile(e.to_string()))?.name.name;
                    if !import_allowed(name) {
                        forbidden.push(name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    match forbidden.is_empty() {
        true => Ok(()),
        false => Err(ValidationError::ForbiddenImports(forbidden)),
    }
}

/// Whether a component may import `name` (e.g. `wasi:io/streams@0.2.3`).
pub fn import_allowed(name: &str) -> bool {
    if ENTITY_IMPORTS.contains(&name) {
        return true;
    }
    let unversioned = name.split_once('@').map_or(name, |(n, _)| n);
    let version_ok = name.split_once('@').is_some_and(|(_, v)| v.starts_with("0.2."));
    version_ok && INERT_WASI_INTERFACES.contains(&unversioned)
}

/// Checks imports and exports of a compiled component.
pub fn check_world(engine: &wasmtime::Engine, component: &Component) -> Result<(), ValidationError> {
    let ty = component.component_type();
    let forbidden: Vec<String> =
        ty.imports(engine).map(|(name, _)| name.to_owned()).filter(|n| !import_allowed(n)).collect();
    if !forbidden.is_empty() {
        return Err(ValidationError::ForbiddenImports(forbidden));
    }
    if !ty.exports(engine).any(|(name, _)| name == HANDLER_EXPORT) {
        return Err(ValidationError::MissingHandler);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_classified() {
        assert_eq!(check_header(b""), Err(ValidationError::Empty));
        assert_eq!(check_header(b"hello world"), Err(ValidationError::NotWasm));
        assert_eq!(check_header(b"\0asm\x01\0\0\0"), Err(ValidationError::CoreModule));
        assert_eq!(check_header(b"\0asm\x0d\0\x01\0"), Ok(()));
        assert!(matches!(check_header(b"\0asm\x02\0\0\0"), Err(ValidationError::UnknownLayer(_))));
    }

    #[test]
    fn only_inert_wasi_and_entity_imports_are_allowed() {
        assert!(import_allowed("conflux:entity/state@0.1.0"));
        assert!(import_allowed("wasi:io/streams@0.2.6"));
        assert!(import_allowed("wasi:cli/environment@0.2.0"));
        assert!(import_allowed("wasi:clocks/wall-clock@0.2.3"));
        // Linked with nothing behind them: no preopens, every socket refused.
        assert!(import_allowed("wasi:filesystem/types@0.2.3"));
        assert!(import_allowed("wasi:filesystem/preopens@0.2.12"));
        assert!(import_allowed("wasi:sockets/tcp@0.2.9"));
        assert!(!import_allowed("wasi:http/outgoing-handler@0.2.3"));
        assert!(!import_allowed("wasi:http/types@0.2.3"));
        assert!(!import_allowed("acme:evil/thing"));
        assert!(!import_allowed("conflux:entity/state@9.9.9"));
        assert!(!import_allowed("wasi:io/streams@0.3.0"));
    }
}
