//! sdgen: Stable Diffusion image generation on candle.
//!
//! Layout: [`loading`] finds and reads weights into [`models`]; [`tokenizer`]
//! and [`rng`] reproduce CLIP's tokenizer and torch's CPU generator;
//! [`prompt`] reads A1111's prompt syntax into weighted 75-token chunks;
//! [`sampling`] holds schedules, the denoiser and the samplers; [`pipeline`]
//! ties them into txt2img, img2img and inpainting, with [`editing`] doing the
//! pixel-side work (masks, canvases, overlays); [`image_io`] reads images and
//! writes PNGs with their parameters.

pub mod batch;
pub mod device;
pub mod editing;
pub mod failure;
pub mod image_io;
pub mod infotext;
pub mod loading;
pub mod memory;
pub mod models;
pub mod pipeline;
pub mod prompt;
pub mod random_model;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
