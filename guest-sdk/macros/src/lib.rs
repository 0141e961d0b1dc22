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

/// How an operation receives the entity.
enum Receiver {
    Ref,
    Mut,
    Value,
}

struct Operation {
    name: String,
    method: syn::Ident,
    receiver: Receiver,
    arg: Option<Type>,
    returns_result: bool,
    span: Span,
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    if !attr.is_empty() {
        return Err(syn::Error::new_spanned(attr, "#[entity] takes no arguments"));
    }
    let imp = match syn::parse2::<Item>(item.clone()) {
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
    let mut ops = Vec::new();
    for item in &imp.items {
        if let ImplItem::Fn(f) = item
            && let Some(op) = operation(f)?
        {
            ops.push(op);
        }
    }
    Ok(generate(&imp, &ops))
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
    let receiver = match (&recv.reference, &recv.mutability) {
        (None, _) => Receiver::Value,
        (Some(_), Some(_)) => Receiver::Mut,
        (Some(_), None) => Receiver::Ref,
    };
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

fn generate(imp: &ItemImpl, ops: &[Operation]) -> TokenStream2 {
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
        let call = quote_spanned! {span=> __this.#method(#call_args) };
        let call = if op.returns_result {
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
        } else {
            call
        };
        let body = match op.receiver {
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
        };
        quote! {
            #name => {
                #parse
                #body
                ::conflux_sdk::__private::reply(__op, &__out)
            }
        }
    });
    let export_struct = format_ident!("__ConfluxEntityExport");
    quote! {
        #imp

        impl ::conflux_sdk::Entity for #ty {
            const OPERATIONS: &'static [&'static str] = &[#(#names),*];

            #[allow(clippy::let_unit_value, clippy::unit_arg)]
            fn dispatch(
                __op: &str,
                __payload: &[u8],
            ) -> ::core::result::Result<::std::vec::Vec<u8>, ::conflux_sdk::Error> {
                match __op {
                    #(#arms)*
                    _ => ::core::result::Result::Err(::conflux_sdk::__private::unknown_operation(
                        __op,
                        #type_name,
                        <Self as ::conflux_sdk::Entity>::OPERATIONS,
                    )),
                }
            }
        }

        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
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

            ::conflux_sdk::bindings::export!(#export_struct);
        };
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
