//! Procedural macros for `conflux-sdk`: the `#[entity]` attribute, which turns an
//! inherent `impl` block into an entity's operation table, its `Entity::dispatch`
//! implementation and (on `wasm32` only) the component export glue.
//!
//! Use it through `conflux_sdk::entity`; see the `conflux-sdk` crate docs for the rules.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::visit::Visit;
use syn::{FnArg, ImplItem, ImplItemFn, Item, ItemImpl, ReturnType, Type, Visibility};

/// Makes the `pub fn`s with a receiver in an inherent `impl` block the operations of an
/// entity. See the `conflux-sdk` crate documentation.
///
/// Only one `#[entity]` may be used per crate.
#[proc_macro_attribute]
pub fn entity(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Marks the state migration of an entity. Only valid on an associated function (no
/// receiver) inside an `#[entity]` impl block, which consumes this attribute; see the
/// `conflux-sdk` crate documentation.
#[proc_macro_attribute]
pub fn migrate(_attr: TokenStream, item: TokenStream) -> TokenStream {
    let item: TokenStream2 = item.into();
    let err = syn::Error::new_spanned(
        &item,
        "#[migrate] only works on an associated function inside an `#[entity]` impl block",
    )
    .to_compile_error();
    quote!(#err #item).into()
}

/// Marks an operation of an `#[entity]` impl block as a continuation: it runs
/// when the reply to an ask arrives, taking `Result<T, AskError>` (and
/// optionally an `AskContext`). See the `conflux-sdk` crate documentation.
#[proc_macro_attribute]
pub fn continuation(_attr: TokenStream, item: TokenStream) -> TokenStream {
    let item: TokenStream2 = item.into();
    let err = syn::Error::new_spanned(&item, "#[continuation] only works on a method inside an `#[entity]` impl block")
        .to_compile_error();
    quote!(#err #item).into()
}

/// A `#[continuation]` method of an entity.
struct ContinuationFn {
    name: String,
    method: syn::Ident,
    receiver: Receiver,
    reply_ty: Type,
    takes_context: bool,
    returns_result: bool,
    span: Span,
}

/// The `#[migrate]` function of an entity.
struct Migration {
    method: syn::Ident,
    returns_result: bool,
    span: Span,
}

/// How an operation receives the entity.
enum Receiver {
    Ref,
    Mut,
    Value,
}

impl Receiver {
    fn of(recv: &syn::Receiver) -> Self {
        match (&recv.reference, &recv.mutability) {
            (None, _) => Receiver::Value,
            (Some(_), Some(_)) => Receiver::Mut,
            (Some(_), None) => Receiver::Ref,
        }
    }
}

struct Operation {
    name: String,
    method: syn::Ident,
    receiver: Receiver,
    arg: Option<Type>,
    returns_result: bool,
    /// What a typed ask of it brings back.
    reply: TokenStream2,
    span: Span,
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    if !attr.is_empty() {
        return Err(syn::Error::new_spanned(attr, "#[entity] takes no arguments"));
    }
    let mut imp = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Impl(imp)) => imp,
        Ok(other) => {
            return Err(syn::Error::new_spanned(
                other,
                "#[entity] must be placed on an inherent `impl` block, e.g. \
                 `#[entity] impl Counter { pub fn add(&mut self, n: i64) -> i64 { .. } }`",
            ));
        }
        Err(e) => return Err(e),
    };
    check_impl(&imp)?;
    let migration = take_migration(&mut imp)?;
    let continuations = take_continuations(&mut imp)?;
    let mut ops = Vec::new();
    for item in &imp.items {
        if let ImplItem::Fn(f) = item
            && !continuations.iter().any(|c| c.method == f.sig.ident)
            && let Some(op) = operation(f)?
        {
            ops.push(op);
        }
    }
    Ok(generate(&imp, &ops, &continuations, migration.as_ref()))
}

fn is_continuation_attr(a: &syn::Attribute) -> bool {
    a.path().is_ident("continuation") || a.path().segments.last().is_some_and(|s| s.ident == "continuation")
}

/// Finds the methods marked `#[continuation]`, checks their signatures and
/// removes the attribute.
fn take_continuations(imp: &mut ItemImpl) -> syn::Result<Vec<ContinuationFn>> {
    let mut found = Vec::new();
    for item in &mut imp.items {
        let ImplItem::Fn(f) = item else { continue };
        let Some(pos) = f.attrs.iter().position(is_continuation_attr) else { continue };
        let attr = f.attrs.remove(pos);
        if !matches!(attr.meta, syn::Meta::Path(_)) {
            return Err(syn::Error::new_spanned(attr, "#[continuation] takes no arguments"));
        }
        let sig = &f.sig;
        let shape = "a continuation looks like `fn on_x(&mut self, reply: Result<T, AskError>, ask: AskContext)`                      (the `ask` argument is optional)";
        let Some(FnArg::Receiver(recv)) = sig.inputs.first() else {
            return Err(syn::Error::new_spanned(sig, shape));
        };
        if !sig.generics.params.is_empty() || sig.asyncness.is_some() || recv.colon_token.is_some() {
            return Err(syn::Error::new_spanned(sig, shape));
        }
        let receiver = Receiver::of(recv);
        let mut args = sig.inputs.iter().skip(1);
        let reply_ty = match args.next() {
            Some(FnArg::Typed(pt)) if is_result(&pt.ty) => (*pt.ty).clone(),
            _ => return Err(syn::Error::new_spanned(sig, shape)),
        };
        let takes_context = match args.next() {
            None => false,
            Some(FnArg::Typed(_)) => true,
            Some(other) => return Err(syn::Error::new_spanned(other, shape)),
        };
        if let Some(extra) = args.next() {
            return Err(syn::Error::new_spanned(extra, shape));
        }
        let returns_result = match &sig.output {
            ReturnType::Default => false,
            ReturnType::Type(_, ty) => is_result(ty),
        };
        found.push(ContinuationFn {
            name: sig.ident.unraw().to_string(),
            method: sig.ident.clone(),
            receiver,
            reply_ty,
            takes_context,
            returns_result,
            span: sig.ident.span(),
        });
    }
    Ok(found)
}

/// The success type of an operation's reply: `T` of `Result<T, E>`, the
/// type itself otherwise, `()` without one.
fn reply_type(output: &ReturnType) -> TokenStream2 {
    let ReturnType::Type(_, ty) = output else { return quote!(()) };
    if is_result(ty)
        && let Type::Path(p) = &**ty
        && let Some(last) = p.path.segments.last()
        && let syn::PathArguments::AngleBracketed(args) = &last.arguments
        && let Some(syn::GenericArgument::Type(t)) = args.args.first()
    {
        return quote!(#t);
    }
    quote!(#ty)
}

fn is_migrate_attr(a: &syn::Attribute) -> bool {
    a.path().is_ident("migrate") || a.path().segments.last().is_some_and(|s| s.ident == "migrate")
}

/// Finds the function marked `#[migrate]`, checks its signature and removes the attribute.
fn take_migration(imp: &mut ItemImpl) -> syn::Result<Option<Migration>> {
    let mut found: Option<Migration> = None;
    for item in &mut imp.items {
        let ImplItem::Fn(f) = item else { continue };
        let Some(pos) = f.attrs.iter().position(is_migrate_attr) else { continue };
        let attr = f.attrs.remove(pos);
        if !matches!(attr.meta, syn::Meta::Path(_)) {
            return Err(syn::Error::new_spanned(attr, "#[migrate] takes no arguments"));
        }
        let sig = &f.sig;
        if found.is_some() {
            return Err(syn::Error::new_spanned(&sig.ident, "an entity has at most one #[migrate] function"));
        }
        if let Some(FnArg::Receiver(r)) = sig.inputs.first() {
            return Err(syn::Error::new_spanned(
                r,
                "#[migrate] goes on an associated function without `self`: the old state may not \
                 parse as the new struct, so read it with `state::get_raw`/`state::get`",
            ));
        }
        if sig.inputs.len() != 1 || !sig.generics.params.is_empty() || sig.asyncness.is_some() {
            return Err(syn::Error::new_spanned(
                sig,
                "#[migrate] function must look like `fn migrate(from_version: u32) -> Result<(), Error>`",
            ));
        }
        let returns_result = match &sig.output {
            ReturnType::Default => false,
            ReturnType::Type(_, ty) => is_result(ty),
        };
        found = Some(Migration { method: sig.ident.clone(), returns_result, span: sig.ident.span() });
    }
    Ok(found)
}

fn check_impl(imp: &ItemImpl) -> syn::Result<()> {
    if let Some((_, path, _)) = &imp.trait_ {
        return Err(syn::Error::new_spanned(
            path,
            "#[entity] must be placed on an inherent `impl` block, not a trait impl",
        ));
    }
    if !imp.generics.params.is_empty() || imp.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &imp.generics,
            "#[entity] cannot be used on a generic impl block: an entity is one concrete type",
        ));
    }
    if !matches!(&*imp.self_ty, Type::Path(_)) {
        return Err(syn::Error::new_spanned(
            &imp.self_ty,
            "#[entity] must be placed on the impl block of a named struct",
        ));
    }
    Ok(())
}

/// The operation described by `f`, or `None` if `f` is not one (not `pub`, or no receiver).
fn operation(f: &ImplItemFn) -> syn::Result<Option<Operation>> {
    if !matches!(f.vis, Visibility::Public(_)) {
        return Ok(None);
    }
    let sig = &f.sig;
    let Some(FnArg::Receiver(recv)) = sig.inputs.first() else {
        return Ok(None);
    };
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            format!(
                "entity operation `{}` cannot be generic: its argument and reply types must be \
                 concrete so the payload can be parsed",
                sig.ident
            ),
        ));
    }
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new_spanned(asyncness, "entity operations cannot be `async`"));
    }
    if recv.colon_token.is_some() {
        return Err(syn::Error::new_spanned(
            recv,
            "entity operations take `&self`, `&mut self` or `self`, not a typed receiver",
        ));
    }
    let receiver = Receiver::of(recv);
    let mut args = sig.inputs.iter().skip(1);
    let arg = match args.next() {
        None => None,
        Some(FnArg::Typed(pt)) => {
            check_arg_type(&sig.ident, &pt.ty)?;
            Some((*pt.ty).clone())
        }
        Some(other) => return Err(syn::Error::new_spanned(other, "unexpected receiver")),
    };
    if let Some(extra) = args.next() {
        return Err(syn::Error::new_spanned(
            extra,
            format!(
                "entity operation `{}` takes more than one payload argument; an operation takes \
                 at most one — bundle the values into a struct or tuple",
                sig.ident
            ),
        ));
    }
    let returns_result = match &sig.output {
        ReturnType::Default => false,
        ReturnType::Type(_, ty) => is_result(ty),
    };
    Ok(Some(Operation {
        name: sig.ident.unraw().to_string(),
        method: sig.ident.clone(),
        receiver,
        arg,
        returns_result,
        reply: reply_type(&sig.output),
        span: sig.ident.span(),
    }))
}

/// Rejects argument types that cannot be deserialised from an owned payload.
fn check_arg_type(method: &syn::Ident, ty: &Type) -> syn::Result<()> {
    struct Finder(Option<syn::Error>, String);
    impl<'a> Visit<'a> for Finder {
        fn visit_type_impl_trait(&mut self, t: &'a syn::TypeImplTrait) {
            self.0.get_or_insert_with(|| {
                syn::Error::new_spanned(
                    t,
                    format!(
                        "entity operation `{}` cannot be generic (`impl Trait` argument): use a \
                         concrete type",
                        self.1
                    ),
                )
            });
        }
        fn visit_type_reference(&mut self, t: &'a syn::TypeReference) {
            self.0.get_or_insert_with(|| {
                syn::Error::new_spanned(
                    t,
                    format!(
                        "the argument of entity operation `{}` must be an owned type (e.g. \
                         `String`, not `&str`): it is parsed from the JSON payload",
                        self.1
                    ),
                )
            });
        }
    }
    let mut finder = Finder(None, method.to_string());
    finder.visit_type(ty);
    finder.0.map_or(Ok(()), Err)
}

/// `Result<..>` by the last path segment (`Result`, `std::result::Result`, `io::Result`, ..).
fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
        Type::Group(g) => is_result(&g.elem),
        Type::Paren(p) => is_result(&p.elem),
        _ => false,
    }
}

/// The call of a method and the reply it makes: the value of an `Ok`, an
/// early return with the error of an `Err`.
fn call_and_unwrap(call: TokenStream2, returns_result: bool, span: Span) -> TokenStream2 {
    if !returns_result {
        return call;
    }
    quote_spanned! {span=>
        match #call {
            ::core::result::Result::Ok(__v) => __v,
            ::core::result::Result::Err(__e) => {
                return ::core::result::Result::Err(
                    ::core::convert::Into::<::conflux_sdk::Error>::into(__e),
                );
            }
        }
    }
}

/// Loads the entity for `receiver`, runs `call`, saves a `&mut self` change.
fn with_entity(receiver: &Receiver, call: TokenStream2, span: Span) -> TokenStream2 {
    match receiver {
        Receiver::Mut => quote_spanned! {span=>
            let (mut __this, __before) =
                ::conflux_sdk::__private::load_for_update::<Self>()?;
            let __out = #call;
            ::conflux_sdk::__private::save_if_changed(&__this, &__before)?;
        },
        Receiver::Ref | Receiver::Value => quote_spanned! {span=>
            let __this = ::conflux_sdk::__private::load::<Self>()?;
            let __out = #call;
        },
    }
}

fn generate(
    imp: &ItemImpl,
    ops: &[Operation],
    continuations: &[ContinuationFn],
    migration: Option<&Migration>,
) -> TokenStream2 {
    let ty = &imp.self_ty;
    let type_name = quote!(#ty).to_string().replace(' ', "");
    let names: Vec<&str> = ops.iter().map(|o| o.name.as_str()).collect();
    let arms = ops.iter().map(|op| {
        let name = &op.name;
        let method = &op.method;
        let span = op.span;
        let parse = match &op.arg {
            Some(arg_ty) => quote_spanned! {span=>
                let __arg: #arg_ty = ::conflux_sdk::__private::parse_payload(__op, __payload)?;
            },
            None => quote_spanned! {span=>
                let () = ::conflux_sdk::__private::parse_payload::<()>(__op, __payload)?;
            },
        };
        let call_args = if op.arg.is_some() { quote!(__arg) } else { quote!() };
        let call = call_and_unwrap(quote_spanned! {span=> __this.#method(#call_args) }, op.returns_result, span);
        let body = with_entity(&op.receiver, call, span);
        quote! {
            #name => {
                #parse
                #body
                ::conflux_sdk::__private::reply(__op, &__out)
            }
        }
    });
    let continuation_arms = continuations.iter().map(|c| {
        let name = &c.name;
        let method = &c.method;
        let span = c.span;
        let reply_ty = &c.reply_ty;
        let args = if c.takes_context { quote!(__reply, __ask) } else { quote!(__reply) };
        let call = call_and_unwrap(quote_spanned! {span=> __this.#method(#args) }, c.returns_result, span);
        let body = with_entity(&c.receiver, call, span);
        quote! {
            #name => {
                #[allow(unused_variables)]
                let (__reply, __ask): (#reply_ty, ::conflux_sdk::messaging::AskContext) =
                    ::conflux_sdk::__private::continuation_input(__op)?;
                #body
                ::conflux_sdk::__private::reply(__op, &__out)
            }
        }
    });
    let continuation_consts = continuations.iter().map(|c| {
        let name = &c.name;
        let reply_ty = &c.reply_ty;
        let konst = format_ident!("{}", c.name.to_uppercase());
        let doc = format!("The continuation `{name}`, for `Ask::then`.");
        quote! {
            #[doc = #doc]
            #[allow(dead_code)]
            pub const #konst: ::conflux_sdk::messaging::Continuation<#reply_ty> =
                ::conflux_sdk::messaging::Continuation::new(#name);
        }
    });
    let migrate_fn = migration.map(|m| {
        let method = &m.method;
        let span = m.span;
        let body = if m.returns_result {
            quote_spanned! {span=>
                Self::#method(__from_version).map_err(::core::convert::Into::<::conflux_sdk::Error>::into)
            }
        } else {
            quote_spanned! {span=>
                Self::#method(__from_version);
                ::core::result::Result::Ok(())
            }
        };
        // The user's error type is often `conflux_sdk::Error` itself; the
        // conversion is for the others, and must not warn in user crates.
        quote! {
            #[allow(clippy::useless_conversion)]
            fn migrate(__from_version: u32) -> ::core::result::Result<(), ::conflux_sdk::Error> {
                #body
            }
        }
    });
    let senders = senders(imp, ops);
    let export_struct = format_ident!("__ConfluxEntityExport");
    quote! {
        #imp

        #senders

        impl #ty {
            #(#continuation_consts)*
        }

        impl ::conflux_sdk::Entity for #ty {
            const OPERATIONS: &'static [&'static str] = &[#(#names),*];

            #[allow(clippy::let_unit_value, clippy::unit_arg)]
            fn dispatch(
                __op: &str,
                __payload: &[u8],
            ) -> ::core::result::Result<::std::vec::Vec<u8>, ::conflux_sdk::Error> {
                match __op {
                    #(#arms)*
                    #(#continuation_arms)*
                    _ => ::core::result::Result::Err(::conflux_sdk::__private::unknown_operation(
                        __op,
                        #type_name,
                        <Self as ::conflux_sdk::Entity>::OPERATIONS,
                    )),
                }
            }

            #migrate_fn
        }

        // A crate that depends on this one for its typed client (feature
        // `client`) exports its own handler, not this one. Most entity
        // crates declare no such feature: the allow keeps them quiet.
        #[doc(hidden)]
        #[allow(unexpected_cfgs)]
        const _: () = {
        #[cfg(all(target_arch = "wasm32", not(feature = "client")))]
        #[allow(unsafe_code)]
        const _: () = {
            struct #export_struct;

            impl ::conflux_sdk::bindings::exports::conflux::entity::handler::Guest for #export_struct {
                fn handle(
                    operation: ::std::string::String,
                    payload: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<u8>,
                    ::conflux_sdk::bindings::exports::conflux::entity::handler::CallError,
                > {
                    <#ty as ::conflux_sdk::Entity>::dispatch(&operation, &payload)
                        .map_err(::core::convert::Into::into)
                }
            }

            impl ::conflux_sdk::bindings::exports::conflux::entity::migration::Guest for #export_struct {
                fn migrate(
                    from_version: u32,
                ) -> ::core::result::Result<(), ::conflux_sdk::bindings::exports::conflux::entity::migration::CallError>
                {
                    <#ty as ::conflux_sdk::Entity>::migrate(from_version).map_err(::core::convert::Into::into)
                }
            }

            ::conflux_sdk::bindings::export!(#export_struct);
        };
        };
    }
}

/// The deployed type name assumed for an entity struct: its name in snake case
/// (`Account` → `account`, `TeamMember` → `team_member`).
fn default_type_name(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Typed senders for the entity's own operations: `X::send_to(id).op(&arg)` and
/// `X::send_after(delay, id).op(&arg)`.
fn senders(imp: &ItemImpl, ops: &[Operation]) -> TokenStream2 {
    let ty = &imp.self_ty;
    let Type::Path(p) = &**ty else { return TokenStream2::new() };
    let Some(last) = p.path.segments.last() else { return TokenStream2::new() };
    let ident = &last.ident;
    let type_name = default_type_name(&ident.to_string());
    let sender = format_ident!("{}Sender", ident);
    let timer = format_ident!("{}Timer", ident);
    let methods = |timed: bool| {
        ops.iter().map(move |op| {
            let name = &op.name;
            let method = &op.method;
            let (param, arg) = match &op.arg {
                Some(t) => (quote!(arg: &#t), quote!(arg)),
                None => (quote!(), quote!(&())),
            };
            if timed {
                quote! {
                    #[doc = concat!("Sets a timer that sends `", #name, "` after the delay.")]
                    pub fn #method(&self, #param) -> ::core::result::Result<::conflux_sdk::messaging::TimerId, ::conflux_sdk::Error> {
                        ::conflux_sdk::messaging::send_after(self.delay, &self.target, #name, #arg)
                    }
                }
            } else {
                quote! {
                    #[doc = concat!("Sends `", #name, "` when this turn commits.")]
                    pub fn #method(&self, #param) -> ::core::result::Result<(), ::conflux_sdk::Error> {
                        ::conflux_sdk::messaging::send(&self.target, #name, #arg)
                    }
                }
            }
        })
    };
    let send_methods = methods(false);
    let timer_methods = methods(true);
    let asker = format_ident!("{}Ask", ident);
    let ask_methods = ops.iter().map(|op| {
        let name = &op.name;
        let method = &op.method;
        let reply = &op.reply;
        let (param, arg) = match &op.arg {
            Some(t) => (quote!(arg: &#t), quote!(arg)),
            None => (quote!(), quote!(&())),
        };
        quote! {
            #[doc = concat!("Asks for `", #name, "`; name the continuation its reply runs with `.then(..)`.")]
            pub fn #method(&self, #param) -> ::conflux_sdk::messaging::Ask<#reply> {
                ::conflux_sdk::messaging::ask(&self.target, #name, #arg)
            }
        }
    });
    let doc_to =
        format!("Sends messages to `{type_name}/<id>` (the type name this entity is assumed to be deployed as).");
    quote! {
        #[doc = #doc_to]
        #[derive(Debug, Clone)]
        pub struct #sender {
            target: ::conflux_sdk::EntityRef,
        }

        impl #sender {
            #(#send_methods)*
        }

        #[doc = #doc_to]
        #[derive(Debug, Clone)]
        pub struct #timer {
            target: ::conflux_sdk::EntityRef,
            delay: ::core::time::Duration,
        }

        impl #timer {
            #(#timer_methods)*
        }

        #[doc = #doc_to]
        #[derive(Debug, Clone)]
        pub struct #asker {
            target: ::conflux_sdk::EntityRef,
        }

        impl #asker {
            #(#ask_methods)*
        }

        impl #ty {
            /// The deployed type name the typed senders address.
            pub const TYPE_NAME: &'static str = #type_name;

            /// Messages to entity `id` of this type, sent when the current turn commits.
            #[allow(dead_code)]
            pub fn send_to(id: impl ::core::convert::Into<::std::string::String>) -> #sender {
                #sender { target: ::conflux_sdk::EntityRef::new(#type_name, id) }
            }

            /// Asks of entity `id` of this type: each operation's reply comes back
            /// to a continuation of the asking entity.
            #[allow(dead_code)]
            pub fn ask(id: impl ::core::convert::Into<::std::string::String>) -> #asker {
                #asker { target: ::conflux_sdk::EntityRef::new(#type_name, id) }
            }

            /// Timers that send to entity `id` of this type after `delay`.
            #[allow(dead_code)]
            pub fn send_after(delay: ::core::time::Duration, id: impl ::core::convert::Into<::std::string::String>) -> #timer {
                #timer { target: ::conflux_sdk::EntityRef::new(#type_name, id), delay }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(item: TokenStream2) -> String {
        match expand(TokenStream2::new(), item) {
            Ok(_) => panic!("expected a compile error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn type_names_default_to_snake_case() {
        assert_eq!(default_type_name("Account"), "account");
        assert_eq!(default_type_name("TeamMember"), "team_member");
        assert_eq!(default_type_name("X"), "x");
    }

    #[test]
    fn rejects_non_impl_items() {
        let e = error_of(quote! { struct Counter; });
        assert!(e.contains("inherent `impl` block"), "{e}");
        let e = error_of(quote! { impl Foo for Counter { } });
        assert!(e.contains("not a trait impl"), "{e}");
    }

    #[test]
    fn rejects_two_payload_args() {
        let e = error_of(quote! { impl C { pub fn add(&mut self, a: i64, b: i64) -> i64 { a + b } } });
        assert!(e.contains("more than one payload argument"), "{e}");
    }

    #[test]
    fn rejects_generic_methods() {
        let e = error_of(quote! { impl C { pub fn add<T>(&mut self, a: T) {} } });
        assert!(e.contains("cannot be generic"), "{e}");
        let e = error_of(quote! { impl C { pub fn add(&mut self, a: impl Into<i64>) {} } });
        assert!(e.contains("cannot be generic"), "{e}");
    }

    #[test]
    fn rejects_borrowed_args_and_attribute_arguments() {
        let e = error_of(quote! { impl C { pub fn add(&mut self, a: &str) {} } });
        assert!(e.contains("owned type"), "{e}");
        let e = match expand(quote!(foo), quote! { impl C {} }) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("takes no arguments"), "{e}");
    }

    #[test]
    fn migrate_needs_an_associated_fn_and_at_most_one() {
        let e = error_of(quote! { impl C { #[migrate] fn m(&mut self, v: u32) {} } });
        assert!(e.contains("without `self`"), "{e}");
        let e = error_of(quote! { impl C { #[migrate] fn m() {} } });
        assert!(e.contains("from_version: u32"), "{e}");
        let e = error_of(quote! { impl C { #[migrate] fn a(v: u32) {} #[migrate] fn b(v: u32) {} } });
        assert!(e.contains("at most one"), "{e}");
        let e = error_of(quote! { impl C { #[migrate(x)] fn a(v: u32) {} } });
        assert!(e.contains("takes no arguments"), "{e}");
    }

    #[test]
    fn migrate_overrides_the_default_and_is_not_an_operation() {
        let out = expand(
            TokenStream2::new(),
            quote! {
                impl C {
                    pub fn get(&self) -> i64 { 1 }
                    #[migrate]
                    pub fn upgrade(from: u32) -> Result<(), Error> { Ok(()) }
                }
            },
        )
        .unwrap()
        .to_string();
        assert!(out.contains(r#"& ["get"]"#), "{out}");
        assert!(out.contains("fn migrate (__from_version : u32)"), "{out}");
        assert!(out.contains("Self :: upgrade (__from_version)"), "{out}");
        assert!(!out.contains("# [migrate]"), "attribute stripped: {out}");
    }

    #[test]
    fn picks_pub_methods_with_receivers_only() {
        let out = expand(
            TokenStream2::new(),
            quote! {
                impl C {
                    pub fn new() -> Self { C }
                    fn helper(&self) {}
                    pub fn r#get(&self) -> i64 { 1 }
                    pub fn set(&mut self, v: i64) -> Result<(), E> { Ok(()) }
                }
            },
        )
        .unwrap()
        .to_string();
        assert!(out.contains(r#"const OPERATIONS : & 'static [& 'static str] = & ["get" , "set"]"#), "{out}");
        assert!(out.contains("target_arch = \"wasm32\""));
    }
}
