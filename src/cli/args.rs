//! Command-line arguments: txt2img options at the top level, and the image
//! editing subcommands that share them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use sdgen::device::{DeviceSpec, Precision};
use sdgen::hires::HiresUpscaler;
use sdgen::loading::lora::LoraArg;
use sdgen::loading::Preset;
use sdgen::models::vae::Tiling;
use sdgen::preprocess::Preprocess;
use sdgen::prompt::Syntax;
use sdgen::request::{Size, TopLeft};
use sdgen::sampling::denoiser::Prediction;
use sdgen::sampling::samplers::SamplerName;
use sdgen::sampling::schedule::ScheduleKind;
use sdgen::settings::{ControlArg, HiresSettings, SessionSettings, Settings};

/// Stable Diffusion on the command line: txt2img (no subcommand), img2img,
/// inpaint, outpaint, batch, replay.
#[derive(Debug, Parser)]
#[command(
    name = "sdgen",
    version,
    about,
    max_term_width = 100,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Transform an image by a prompt.
    Img2img {
        /// The image to start from (PNG/JPEG); its size is the output size
        /// unless --width/--height resize it.
        #[arg(long, value_name = "PATH")]
        init_image: PathBuf,
        /// How much to change it: 1 repaints everything, small values keep it close.
        #[arg(long, default_value_t = sdgen::session::IMG2IMG_STRENGTH, allow_negative_numbers = true)]
        strength: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Repaint the white part of a mask.
    Inpaint {
        /// The image to edit (PNG/JPEG).
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// Same size as the image; white (≥ 50 % luminance, or alpha for a
        /// single-colour image with transparency) = repaint.
        #[arg(long, value_name = "PATH")]
        mask: PathBuf,
        #[command(flatten)]
        edit: EditArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Extend an image beyond its borders.
    Outpaint {
        /// The image to extend (PNG/JPEG).
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// Pixels to add on every side (multiples of 8); the --pad-* options override it per side.
        #[arg(long, default_value_t = 0)]
        pad: usize,
        #[arg(long)]
        pad_left: Option<usize>,
        #[arg(long)]
        pad_right: Option<usize>,
        #[arg(long)]
        pad_top: Option<usize>,
        #[arg(long)]
        pad_bottom: Option<usize>,
        #[command(flatten)]
        edit: EditArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Generate every job of a prompt file into a folder (resumable).
    Batch {
        /// Prompt file: one job per line (plain text, `#` comments, `--option`
        /// lines with shell quoting) or JSON Lines (`.jsonl`); `-` = stdin.
        file: PathBuf,
        /// Folder for the images and the manifest (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        /// Only jobs with index ≡ K (mod N), for splitting one file across machines.
        #[arg(long, value_name = "K/N")]
        shard: Option<sdgen::batch::Shard>,
        /// Regenerate images already in the manifest.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Regenerate an image from the parameters stored in its PNG; options
    /// given here override the stored ones.
    Replay {
        /// A PNG written by sdgen or AUTOMATIC1111.
        image: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// List the samplers and schedules.
    Samplers,
    /// Show how a prompt is split into tokens and chunks, with each token's
    /// weight, as the text encoder gets them.
    Tokenize {
        #[arg(long, short, allow_hyphen_values = true)]
        prompt: String,
        /// Use this model's tokenizer [default: CLIP's, as SD 1.x].
        #[arg(long, value_name = "NAME|PATH")]
        model: Option<String>,
        #[command(flatten)]
        models: ModelsDir,
        /// a1111 or plain [default: a1111].
        #[arg(long, value_name = "a1111|plain")]
        prompt_syntax: Option<Syntax>,
        /// `{"chunks": [{"ids": [...], "weights": [...]}], "token_count": N}`.
        #[arg(long)]
        json: bool,
    },
    /// List the models in the models dir: name, format, family, inpainting,
    /// prediction, dtype, size and hash (cached beside each file).
    Models {
        #[command(flatten)]
        models: ModelsDir,
        /// One JSON object per model and line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enlarge an image with an upscaler model (ESRGAN, Real-ESRGAN,
    /// SRVGGNetCompact; from <models>/ESRGAN, RealESRGAN or upscale_models)
    /// or a resampler (lanczos, nearest). Its PNG parameters are kept, with
    /// A1111's postprocessing keys added.
    Upscale {
        /// The image to enlarge (PNG/JPEG).
        image: PathBuf,
        /// A model name or path, or `lanczos` / `nearest`.
        #[arg(long, value_name = "NAME|PATH")]
        upscaler: String,
        /// How much larger [default: the model's own scale]; as A1111 does
        /// it: the model runs (again while smaller), then Lanczos resizes to
        /// the side × scale rounded down to a multiple of 8.
        #[arg(long)]
        scale: Option<f64>,
        #[arg(long, short, value_name = "PATH", default_value = "upscaled.png")]
        out: PathBuf,
        /// Input pixels per tile side; each tile also sees up to 32 pixels of
        /// context around it, cropped away.
        #[arg(long, default_value_t = sdgen::upscale::TILE)]
        tile: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        #[command(flatten)]
        models: ModelsDir,
    },
    /// Write a weight file as safetensors: PyTorch pickles (.ckpt, .pt,
    /// .pth, .bin) are read as data, never run; tensors sorted by name, the
    /// source's SHA-256 in the metadata.
    Convert {
        /// The file to convert (a pickle or safetensors).
        input: PathBuf,
        /// The .safetensors file to write (replaced if it exists).
        output: PathBuf,
        /// Cast float tensors as `tensor.to(dtype)` does: f16, bf16 or f32
        /// [default: as stored]; integer tensors are kept.
        #[arg(long, value_parser = sdgen::loading::convert::parse_dtype)]
        dtype: Option<safetensors::Dtype>,
    },
    /// Serve AUTOMATIC1111's HTTP API (/sdapi/v1) and OpenAI's images API
    /// (/v1/images/generations), one generation at a time.
    Serve(ServeArgs),
    /// Developer tools.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a model with random weights and the real shapes of a family
    /// (a diffusers folder, f16; SD 1.5 also as one LDM-named file), for
    /// benchmarks.
    RandomModel {
        /// Model family: sd15, sdxl or sd35m (SD 3.5 Medium, without T5).
        #[arg(long, default_value = "sd15")]
        family: String,
        /// Folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Time UNet passes alone (random latents, a zero text context) and the
    /// VAE decode of one image; prints JSON. For profiling and benchmarks.
    UnetBench {
        /// Model file or folder.
        #[arg(long)]
        model: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// UNet batch (2 = one image with guidance).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Timed passes after one warm-up (the median is reported).
        #[arg(long, default_value_t = 3)]
        passes: usize,
        /// Skip the VAE decode.
        #[arg(long)]
        no_decode: bool,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
        #[arg(long)]
        dtype: Option<Precision>,
    },
    /// Check each fused op on a device against its CPU forward on every
    /// layer shape of SD 1.5's UNet and VAE, with random inputs; prints the
    /// errors and a JSON summary, and fails beyond the bound.
    OpsCheck {
        /// Image side in pixels the shapes are taken at.
        #[arg(long, default_value_t = 512)]
        size: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
        #[arg(long)]
        dtype: Option<Precision>,
    },
    /// Measure the matrix-multiply rate of this build's backend (the peak
    /// that benchmarks compare achieved GFLOP/s against); prints JSON.
    MatmulPeak {
        /// Square matrix size.
        #[arg(long, default_value_t = 2048)]
        size: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
        #[arg(long)]
        dtype: Option<Precision>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback should come with --api-auth.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one, printed at start).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Model loaded for requests that name none [default: the only one in the models dir].
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    #[command(flatten)]
    pub models: ModelsDir,
    /// HTTP Basic credentials, USER:PASS[,USER:PASS…], required on every route.
    #[arg(long, value_name = "USER:PASS[,…]")]
    pub api_auth: Option<String>,
    /// Jobs that may wait behind the running one; more get 429.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Where requests with save_images write their PNGs.
    #[arg(long, value_name = "DIR", default_value = "outputs")]
    pub out_dir: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
    #[arg(long)]
    pub dtype: Option<Precision>,
    /// Never download a model.
    #[arg(long)]
    pub offline: bool,
}

impl ServeArgs {
    /// The credentials of --api-auth; a pair without a colon is an error.
    pub fn credentials(&self) -> anyhow::Result<Vec<(String, String)>> {
        let Some(list) = &self.api_auth else { return Ok(Vec::new()) };
        list.split(',')
            .map(|pair| match pair.split_once(':') {
                Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok((u.to_string(), p.to_string())),
                _ => anyhow::bail!("--api-auth: {pair:?} is not USER:PASS"),
            })
            .collect()
    }

    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            model: self.model.clone(),
            models_dir: self.models.models_dir.clone(),
            device: self.device,
            dtype: self.dtype,
            preset: None,
            prediction: None,
            vae_tiling: Tiling::Auto,
            loras: Vec::new(),
            vae: None,
            offline: self.offline,
            quiet: true,
            batch_size: 1,
            swappable_loras: true,
            no_t5: false,
            text_encoders: Vec::new(),
            t5_tokenizer: None,
        }
    }
}

/// The models dir option.
#[derive(Debug, Clone, Args)]
pub struct ModelsDir {
    /// Where models live [default: $SDGEN_MODELS_DIR, else ./models].
    #[arg(
        long,
        value_name = "DIR",
        env = "SDGEN_MODELS_DIR",
        default_value = "models",
        hide_default_value = true,
        hide_env = true
    )]
    pub models_dir: PathBuf,
}

/// Options of the mask-based commands.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// How much of the masked area to repaint: 1 starts from pure noise.
    #[arg(long, default_value_t = sdgen::session::INPAINT_STRENGTH, allow_negative_numbers = true)]
    pub strength: f64,
    /// Fade the result in from the mask's edge over PX pixels (inward only).
    #[arg(long, value_name = "PX", default_value_t = 0.0)]
    pub mask_blur: f32,
}

/// Options every command shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Model: a .safetensors checkpoint, a diffusers folder, or a name in the
    /// models dir. Default: the only model there (downloaded on first use).
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    #[command(flatten)]
    pub models: ModelsDir,
    /// What to draw (required except for batch and replay).
    #[arg(long, short, allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// What to steer away from [default: none].
    #[arg(long, short, allow_hyphen_values = true)]
    pub negative_prompt: Option<String>,
    /// Random seed [default: random, printed and stored in the PNG; for
    /// batch, the base seed of the file].
    #[arg(long, short)]
    pub seed: Option<u64>,
    /// Denoising steps [default: 20].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less runs the prompt alone [default: 7.5].
    #[arg(long, allow_negative_numbers = true)]
    pub cfg_scale: Option<f64>,
    /// Image width in pixels, a multiple of 8 [default: the model's native
    /// size; for editing, the input's].
    #[arg(long, short = 'W')]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: as for --width].
    #[arg(long, short = 'H')]
    pub height: Option<usize>,
    /// Sampler: a name from `sdgen samplers` (e.g. dpmpp_2m, euler_a) or an
    /// A1111 name ("DPM++ 2M Karras") [default: dpmpp_2m with karras].
    #[arg(long)]
    pub sampler: Option<SamplerName>,
    /// Schedule: normal, karras, exponential, beta, trailing, leading,
    /// linspace [default: karras with the default sampler, else normal].
    #[arg(long)]
    pub schedule: Option<ScheduleKind>,
    /// A LoRA merged into the weights: a path, or a name in <models>/Lora/
    /// or <models>/loras/, with an optional weight (`fluffy:0.8`);
    /// repeatable. `<lora:NAME:WEIGHT>` in the prompt does the same.
    #[arg(long, value_name = "NAME|PATH[:WEIGHT]")]
    pub lora: Vec<LoraArg>,
    /// Another VAE: a single .safetensors file (original or diffusers names),
    /// a path or a name in <models>/VAE/.
    #[arg(long, value_name = "NAME|PATH")]
    pub vae: Option<String>,
    /// How prompts are read: a1111 (weights like `(word:1.2)`, `BREAK`, any
    /// length in 75-token chunks) or plain (literal text cut at 75 tokens,
    /// as diffusers) [default: a1111].
    #[arg(long, value_name = "a1111|plain")]
    pub prompt_syntax: Option<Syntax>,
    /// Use the text encoder's output N − 1 layers before its usual one
    /// (A1111's "Clip skip"; diffusers' clip_skip = N − 1) [default: 1].
    #[arg(long, value_name = "N")]
    pub clip_skip: Option<usize>,
    /// SDXL size conditioning: the original size to condition on, WIDTHxHEIGHT
    /// [default: the output size].
    #[arg(long, value_name = "WxH")]
    pub original_size: Option<Size>,
    /// SDXL size conditioning: the crop's top-left corner, TOP,LEFT in pixels [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT")]
    pub crop_top_left: Option<TopLeft>,
    /// SDXL size conditioning: the target size, WIDTHxHEIGHT [default: the output size].
    #[arg(long, value_name = "WxH")]
    pub target_size: Option<Size>,
    /// A ControlNet and its control image, repeatable (their effects add
    /// up): a ControlNet folder or .safetensors file, or a name in
    /// <models>/ControlNet/; the image is stretched to the output size (no
    /// crop: A1111's "Just Resize", not its default "Crop and Resize");
    /// WEIGHT scales its effect [default: 1]; it acts from START to END, as
    /// fractions of the steps [default: 0:1]. A ':' inside PATH or IMAGE is
    /// not supported.
    #[arg(long, value_name = "PATH:IMAGE[:WEIGHT[:START:END]]")]
    pub control: Vec<ControlArg>,
    /// What is done to every control image first: none (it already is a
    /// control map: edges, depth, pose …) or canny[:LOW:HIGH] (OpenCV's Canny
    /// edges, thresholds 100:200 by default). Depth and pose detectors need
    /// their own models and are not built in [default: none].
    #[arg(long, value_name = "none|canny[:LOW:HIGH]")]
    pub control_preprocess: Option<Preprocess>,
    /// ControlNets see only the prompt's half of guidance, their residuals
    /// scaled from 0.1 to 1 (diffusers' guess_mode; A1111's "ControlNet is
    /// more important").
    #[arg(long)]
    pub control_guess_mode: bool,
    /// Number of images; image i uses seed + i [default: 1].
    #[arg(long)]
    pub batch_count: Option<usize>,
    /// Images generated together in one UNet batch (faster on GPUs, more
    /// memory); in `batch`, consecutive jobs with equal size, steps, sampler
    /// and guidance share UNet calls, up to this many [default: 1].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
    #[arg(long)]
    pub dtype: Option<Precision>,
    /// standard or turbo (1 step of euler_a on trailing timesteps, no
    /// guidance) [default: turbo when the model's name says so].
    #[arg(long, value_name = "standard|turbo")]
    pub preset: Option<Preset>,
    /// What the UNet predicts: eps or v [default: the folder's scheduler
    /// config; for SD 2.x single files, detected from the weights].
    #[arg(long, value_name = "eps|v")]
    pub prediction: Option<Prediction>,
    /// Output PNG; with --batch-count N > 1, NAME-0.png … NAME-(N-1).png
    /// [default: sdgen.png; for replay, IMAGE-replay.png].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Never download a model (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// No progress bars and no per-image summary (batch still reports its totals).
    #[arg(long, short)]
    pub quiet: bool,
    /// Also list the checkpoint tensors the model did not use.
    #[arg(long, short)]
    pub verbose: bool,
    /// Decode (and, for img2img/inpaint, encode) in overlapping tiles to bound
    /// memory: auto (above ~800² on SD models), on or off. Tiles differ
    /// slightly from a whole pass.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    pub vae_tiling: Tiling,
    /// SD 3.5: leave out the T5 text encoder (its part of the conditioning
    /// is zeros, as diffusers does without it): about 9.5 GB less in f16.
    #[arg(long)]
    pub no_t5: bool,
    /// SD 3.5 single files without bundled text encoders: a CLIP-L, CLIP-G
    /// or T5 file, repeatable [default: clip_l*, clip_g*, t5xxl*.safetensors
    /// in <models>/text_encoders/ or <models>/clip/].
    #[arg(long, value_name = "PATH")]
    pub text_encoder: Vec<PathBuf>,
    /// SD 3.5 single files: T5's tokenizer.json [default: T5 v1.1's, built in].
    #[arg(long, value_name = "PATH")]
    pub t5_tokenizer: Option<PathBuf>,
    /// Print per-phase timings (load, text encoding, each UNet step, VAE
    /// decode, peak memory) as one JSON line on stderr.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub hires: HiresArgs,
}

/// The hires fix of txt2img (A1111's "Hires. fix"): generate at the size
/// asked for, upscale, and repaint the result partly at the larger size.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Hires fix (txt2img)")]
pub struct HiresArgs {
    /// Turn it on: the second pass is int(W·F) × int(H·F), rounded down to
    /// multiples of 8.
    #[arg(long, value_name = "F")]
    pub hires_scale: Option<f64>,
    /// Turn it on at this size instead (0 for one side: from the other and
    /// the aspect); another aspect than the first pass's is covered, then
    /// cropped to it, as A1111 does.
    #[arg(long, value_name = "WxH")]
    pub hires_size: Option<Size>,
    /// latent (bilinear), latent-antialiased, latent-bicubic,
    /// latent-bicubic-antialiased, latent-nearest, latent-nearest-exact
    /// (A1111's names work too), or an upscaler model (`sdgen upscale`) or
    /// lanczos / nearest, which enlarge the decoded image [default: latent].
    #[arg(long, value_name = "NAME")]
    pub hires_upscaler: Option<HiresUpscaler>,
    /// Steps the second pass runs: the last N of a schedule of
    /// N / denoise steps, as A1111 does [default: 0 = as many as --steps].
    #[arg(long, value_name = "N")]
    pub hires_steps: Option<usize>,
    /// How much the second pass repaints, in (0, 1] [default: 0.7].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub hires_denoise: Option<f64>,
    /// The second pass's sampler [default: --sampler's].
    #[arg(long, value_name = "NAME")]
    pub hires_sampler: Option<SamplerName>,
    /// The second pass's schedule [default: --schedule's].
    #[arg(long, value_name = "NAME")]
    pub hires_schedule: Option<ScheduleKind>,
    /// The second pass's prompt [default: --prompt].
    #[arg(long, allow_hyphen_values = true)]
    pub hires_prompt: Option<String>,
    /// The second pass's negative prompt [default: --negative-prompt].
    #[arg(long, allow_hyphen_values = true)]
    pub hires_negative_prompt: Option<String>,
    /// The second pass's guidance scale [default: --cfg-scale].
    #[arg(long, allow_negative_numbers = true)]
    pub hires_cfg_scale: Option<f64>,
}

impl HiresArgs {
    fn settings(&self) -> HiresSettings {
        HiresSettings {
            scale: self.hires_scale,
            size: self.hires_size,
            upscaler: self.hires_upscaler.clone(),
            steps: self.hires_steps,
            denoise: self.hires_denoise,
            sampler: self.hires_sampler,
            schedule: self.hires_schedule,
            prompt: self.hires_prompt.clone(),
            negative_prompt: self.hires_negative_prompt.clone(),
            cfg_scale: self.hires_cfg_scale,
        }
    }
}

impl Common {
    /// The per-image settings the command line gives.
    pub fn settings(&self) -> Settings {
        Settings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            width: self.width,
            height: self.height,
            sampler: self.sampler,
            schedule: self.schedule,
            batch_count: self.batch_count,
            clip_skip: self.clip_skip,
            prompt_syntax: self.prompt_syntax,
            original_size: self.original_size,
            crop_top_left: self.crop_top_left,
            target_size: self.target_size,
            controls: (!self.control.is_empty()).then(|| self.control.clone()),
            control_preprocess: self.control_preprocess,
            control_guess_mode: self.control_guess_mode.then_some(true),
            hires: self.hires.settings(),
        }
    }

    /// What the session is opened with.
    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            model: self.model.clone(),
            models_dir: self.models.models_dir.clone(),
            device: self.device,
            dtype: self.dtype,
            preset: self.preset,
            prediction: self.prediction,
            vae_tiling: self.vae_tiling,
            loras: self.lora.clone(),
            vae: self.vae.clone(),
            offline: self.offline,
            quiet: self.quiet,
            batch_size: self.batch_size.unwrap_or(1),
            swappable_loras: false,
            no_t5: self.no_t5,
            text_encoders: self.text_encoder.clone(),
            t5_tokenizer: self.t5_tokenizer.clone(),
        }
    }
}
