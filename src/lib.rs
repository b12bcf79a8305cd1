//! sdgen: Stable Diffusion image generation on candle.
//!
//! Layers, top down (ARCHITECTURE.md has the map):
//! - [`settings`] parses and checks what the user asks for and resolves it
//!   into a [`request::Request`]; [`session`] loads a model once and runs
//!   requests into PNGs for every front end ([`batch`] adds job files).
//! - [`pipeline`] turns a request into images: text conditioning ([`text`],
//!   [`prompt`], [`tokenizer`]), the seed's noise ([`rng`]), [`sampling`], decoding,
//!   with [`editing`] doing the pixel-side work of img2img and inpainting
//!   and [`preprocess`] that of control images; [`upscale`] enlarges
//!   images with upscaler models or resamplers, which [`hires`] (the
//!   hires fix's second pass) also does to latents.
//! - [`loading`] finds and reads weights into [`models`], whose hot
//!   operations are our own fused [`ops`]; [`image_io`] and
//!   [`infotext`] read and write images and their parameters.

pub mod batch;
pub mod bench;
pub mod device;
pub mod editing;
pub mod failure;
pub mod files;
pub mod hires;
pub mod image_io;
pub mod infotext;
pub mod loading;
pub mod memory;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod random_model;
pub mod request;
pub mod rng;
pub mod sampling;
pub mod session;
pub mod settings;
pub mod text;
pub mod timings;
pub mod tokenizer;
pub mod upscale;
