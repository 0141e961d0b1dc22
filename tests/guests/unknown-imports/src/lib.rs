//! A component that imports an interface of an unknown package and one named
//! like `wasi:http`. Uploading it must fail, naming both imports.
// The raw wit-bindgen glue (no SDK here) is made of unsafe FFI shims.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    inline: "
        package test:unknown-imports;

        package acme:evil {
            interface thing {
                poke: func();
            }
        }

        package wasi:http@1.0.0 {
            interface outgoing-handler {
                handle: func();
            }
        }

        world evil {
            import acme:evil/thing;
            import wasi:http/outgoing-handler@1.0.0;
            export run: func();
        }
    ",
    generate_all,
});

struct Evil;

impl Guest for Evil {
    fn run() {
        acme::evil::thing::poke();
        wasi::http::outgoing_handler::handle();
    }
}

export!(Evil);
