//! Turns a core WebAssembly module built with the SDK (wit-bindgen's type section inside)
//! into a component, the form the router loads. Used by `switchyard plugin componentize`
//! and the project's policy build.

pub fn componentize(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    let component = wit_component::ComponentEncoder::default().module(module)?.validate(true).encode()?;
    Ok(component)
}
