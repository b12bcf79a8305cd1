//! Single-file checkpoints with the original CompVis/LDM names: the name
//! tables (LDM → diffusers names, which our models use) and the inference of
//! every config from the tensors' names and shapes.

use std::collections::HashMap;

use anyhow::{bail, Context};

use super::weights::{NameMap, Rule, Transform};
use crate::models::clip::{Activation, ClipConfig};
use crate::models::controlnet::ControlNetConfig;
use crate::models::mmdit::MmditConfig;
use crate::models::t5::T5Config;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::models::PerBlock;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x text encoders; older transformers versions stored no `text_model.`.
pub const CLIP_PREFIXES: &[&str] = &["cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."];
/// SD 2.x: the OpenCLIP ViT-H text tower, in open_clip's own names.
pub const OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (CLIP ViT-L, transformers names).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.text_model.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG, open_clip names).
pub const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";

use Transform::{Conv1x1ToLinear as Squeeze, None as Keep};

/// ResNet block internals: diffusers name → LDM name (UNet).
const UNET_RESNET: &[(&str, &str, Transform)] = &[
    ("norm1.", "in_layers.0.", Keep),
    ("conv1.", "in_layers.2.", Keep),
    ("time_emb_proj.", "emb_layers.1.", Keep),
    ("norm2.", "out_layers.0.", Keep),
    ("conv2.", "out_layers.3.", Keep),
    ("conv_shortcut.", "skip_connection.", Keep),
];

/// ResNet block internals of the VAE.
const VAE_RESNET: &[(&str, &str, Transform)] = &[("conv_shortcut.", "nin_shortcut.", Keep)];

/// The VAE's mid-block attention, stored as 1×1 convolutions.
const VAE_ATTENTION: &[(&str, &str, Transform)] = &[
    ("group_norm.", "norm.", Keep),
    ("to_q.", "q.", Squeeze),
    ("to_k.", "k.", Squeeze),
    ("to_v.", "v.", Squeeze),
    ("to_out.0.", "proj_out.", Squeeze),
];

/// Top-level UNet layers.
const UNET_TOP: &[(&str, &str, Transform)] = &[
    ("time_embedding.linear_1.", "time_embed.0.", Keep),
    ("time_embedding.linear_2.", "time_embed.2.", Keep),
    ("time_embedding.cond_proj.", "time_embed.cond_proj.", Keep),
    // SDXL's pooled-text-and-size embedding.
    ("add_embedding.linear_1.", "label_emb.0.0.", Keep),
    ("add_embedding.linear_2.", "label_emb.0.2.", Keep),
    ("conv_in.", "input_blocks.0.0.", Keep),
    ("conv_norm_out.", "out.0.", Keep),
    ("conv_out.", "out.2.", Keep),
];

/// One OpenCLIP residual block as a CLIP encoder layer.
const OPENCLIP_LAYER: &[(&str, &str, Transform)] = &[
    ("layer_norm1.", "ln_1.", Keep),
    ("layer_norm2.", "ln_2.", Keep),
    ("self_attn.q_proj.", "attn.in_proj_", Transform::Rows { index: 0, parts: 3 }),
    ("self_attn.k_proj.", "attn.in_proj_", Transform::Rows { index: 1, parts: 3 }),
    ("self_attn.v_proj.", "attn.in_proj_", Transform::Rows { index: 2, parts: 3 }),
    ("self_attn.out_proj.", "attn.out_proj.", Keep),
    ("mlp.fc1.", "mlp.c_fc.", Keep),
    ("mlp.fc2.", "mlp.c_proj.", Keep),
];

/// OpenCLIP's embeddings; the positional one is a bare tensor.
const OPENCLIP_EMBEDDINGS: &[(&str, &str, Transform)] =
    &[("token_embedding.", "token_embedding.", Keep), ("position_embedding.weight", "positional_embedding", Keep)];

/// Top-level VAE layers (same on both halves).
const VAE_TOP: &[(&str, &str, Transform)] = &[("conv_norm_out.", "norm_out.", Keep)];

fn rule(model: String, ckpt: String, inner: &'static [(&'static str, &'static str, Transform)]) -> Rule {
    Rule { model, ckpt, inner }
}

/// The UNet's table for a given block layout. LDM numbers the blocks of each
/// path consecutively: `input_blocks.0` is conv_in, then per level
/// `layers_per_block` (ResNet[, attention]) blocks and one downsampler.
pub fn unet_names(cfg: &UNetConfig) -> NameMap {
    NameMap::new(unet_rules(cfg, UNET_PREFIX))
}

/// The rules of [`unet_names`] for UNet names under `p`.
fn unet_rules(cfg: &UNetConfig, p: &str) -> Vec<Rule> {
    let n = cfg.block_out_channels.len();
    let l = cfg.layers_per_block;
    let mut rules = vec![rule(String::new(), p.to_string(), UNET_TOP)];
    for i in 0..n {
        for j in 0..l {
            let k = 1 + i * (l + 1) + j;
            rules.push(rule(format!("down_blocks.{i}.resnets.{j}."), format!("{p}input_blocks.{k}.0."), UNET_RESNET));
            rules.push(rule(format!("down_blocks.{i}.attentions.{j}."), format!("{p}input_blocks.{k}.1."), &[]));
        }
        let k = (i + 1) * (l + 1);
        rules.push(rule(format!("down_blocks.{i}.downsamplers.0.conv."), format!("{p}input_blocks.{k}.0.op."), &[]));
        let has_attention = cfg.up_block_types[i].starts_with("CrossAttn");
        for j in 0..=l {
            let k = i * (l + 1) + j;
            rules.push(rule(format!("up_blocks.{i}.resnets.{j}."), format!("{p}output_blocks.{k}.0."), UNET_RESNET));
            rules.push(rule(format!("up_blocks.{i}.attentions.{j}."), format!("{p}output_blocks.{k}.1."), &[]));
        }
        let k = i * (l + 1) + l;
        let slot = if has_attention { 2 } else { 1 };
        rules.push(rule(format!("up_blocks.{i}.upsamplers.0."), format!("{p}output_blocks.{k}.{slot}."), &[]));
    }
    rules.push(rule("mid_block.resnets.0.".into(), format!("{p}middle_block.0."), UNET_RESNET));
    rules.push(rule("mid_block.attentions.0.".into(), format!("{p}middle_block.1."), &[]));
    rules.push(rule("mid_block.resnets.1.".into(), format!("{p}middle_block.2."), UNET_RESNET));
    rules
}

/// The original ControlNet format's table, names under `p` (`control_model.`
/// or nothing): the UNet's first half as in a checkpoint, the control
/// image's embedding as `input_hint_block` (a `Sequential` whose SiLUs take
/// the odd indices), the residuals' 1×1 convolutions as `zero_convs` and
/// `middle_block_out`.
pub fn controlnet_names(cfg: &ControlNetConfig, p: &str) -> NameMap {
    let mut rules = unet_rules(&cfg.unet.mirrored(), p);
    let convs = 2 * cfg.conditioning_embedding_out_channels.len();
    rules.push(rule("controlnet_cond_embedding.conv_in.".into(), format!("{p}input_hint_block.0."), &[]));
    for j in 0..convs - 2 {
        rules.push(rule(
            format!("controlnet_cond_embedding.blocks.{j}."),
            format!("{p}input_hint_block.{}.", 2 * (j + 1)),
            &[],
        ));
    }
    rules.push(rule(
        "controlnet_cond_embedding.conv_out.".into(),
        format!("{p}input_hint_block.{}.", 2 * (convs - 1)),
        &[],
    ));
    let skips = skip_count(&cfg.unet);
    for i in 0..skips {
        rules.push(rule(format!("controlnet_down_blocks.{i}."), format!("{p}zero_convs.{i}.0."), &[]));
    }
    rules.push(rule("controlnet_mid_block.".into(), format!("{p}middle_block_out.0."), &[]));
    NameMap::new(rules)
}

/// How many skip connections a UNet of this layout has (`conv_in`, each
/// down layer, each downsampler).
fn skip_count(cfg: &UNetConfig) -> usize {
    let n = cfg.block_out_channels.len();
    1 + n * cfg.layers_per_block + n - 1
}

/// The VAE's table for names under `p` (`first_stage_model.` in full
/// checkpoints, nothing in VAE files). LDM's decoder numbers its `up`
/// levels in encoder order, diffusers' `up_blocks` in the order they run.
pub fn vae_names(cfg: &VaeConfig, p: &str) -> NameMap {
    let n = cfg.block_out_channels.len();
    let mut rules = Vec::new();
    for half in ["encoder", "decoder"] {
        rules.push(rule(format!("{half}."), format!("{p}{half}."), VAE_TOP));
        rules.push(rule(format!("{half}.mid_block.resnets.0."), format!("{p}{half}.mid.block_1."), VAE_RESNET));
        rules.push(rule(format!("{half}.mid_block.attentions.0."), format!("{p}{half}.mid.attn_1."), VAE_ATTENTION));
        rules.push(rule(format!("{half}.mid_block.resnets.1."), format!("{p}{half}.mid.block_2."), VAE_RESNET));
    }
    for i in 0..n {
        let k = n - 1 - i;
        for j in 0..=cfg.layers_per_block {
            rules.push(rule(
                format!("encoder.down_blocks.{i}.resnets.{j}."),
                format!("{p}encoder.down.{i}.block.{j}."),
                VAE_RESNET,
            ));
            rules.push(rule(
                format!("decoder.up_blocks.{i}.resnets.{j}."),
                format!("{p}decoder.up.{k}.block.{j}."),
                VAE_RESNET,
            ));
        }
        rules.push(rule(
            format!("encoder.down_blocks.{i}.downsamplers.0."),
            format!("{p}encoder.down.{i}.downsample."),
            &[],
        ));
        rules.push(rule(format!("decoder.up_blocks.{i}.upsamplers.0."), format!("{p}decoder.up.{k}.upsample."), &[]));
    }
    rules.push(rule(String::new(), p.to_string(), &[]));
    NameMap::new(rules)
}

/// An OpenCLIP text tower under `p` as a CLIP text model of `layers` layers
/// (and its projection, stored transposed).
pub fn openclip_names(p: &str, layers: usize) -> NameMap {
    let mut rules = vec![
        rule("embeddings.".into(), p.to_string(), OPENCLIP_EMBEDDINGS),
        rule("final_layer_norm.".into(), format!("{p}ln_final."), &[]),
        rule("text_projection.weight".into(), format!("{p}text_projection"), &[("", "", Transform::Transpose)]),
    ];
    for i in 0..layers {
        rules.push(rule(format!("encoder.layers.{i}."), format!("{p}transformer.resblocks.{i}."), OPENCLIP_LAYER));
    }
    NameMap::new(rules)
}

/// The tensors of a checkpoint by name, for config inference.
pub struct Tensors(HashMap<String, Vec<usize>>);

impl Tensors {
    pub fn new(shapes: Vec<(String, Vec<usize>)>) -> Self {
        Self(shapes.into_iter().collect())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub fn any_with_prefix(&self, prefix: &str) -> bool {
        self.0.keys().any(|k| k.starts_with(prefix))
    }

    pub fn shape(&self, name: &str) -> anyhow::Result<&[usize]> {
        self.0.get(name).map(Vec::as_slice).with_context(|| format!("missing tensor `{name}`"))
    }

    pub fn dim(&self, name: &str, i: usize) -> anyhow::Result<usize> {
        let s = self.shape(name)?;
        s.get(i).copied().with_context(|| format!("tensor `{name}` has shape {s:?}, expected at least {} dims", i + 1))
    }

    /// The largest `N` in names `prefix N. ...`, plus one (0 if none):
    /// the length of a numbered sequence that may skip indices.
    pub fn numbered_len(&self, prefix: &str) -> usize {
        let numbers = self.0.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok());
        numbers.max().map_or(0, |n| n + 1)
    }

    /// How many distinct `N` appear in names `prefix N. ...`.
    fn count(&self, prefix: &str) -> usize {
        let mut seen = std::collections::HashSet::new();
        for k in self.0.keys() {
            if let Some(rest) = k.strip_prefix(prefix) {
                if let Some(n) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                    seen.insert(n);
                }
            }
        }
        seen.len()
    }
}

/// The UNet's config from an LDM checkpoint; `pooled_dim` is the width of
/// SDXL's pooled text embedding, which the added embedding's input holds
/// beside six size sinusoids.
pub fn infer_unet(t: &Tensors, pooled_dim: Option<usize>) -> anyhow::Result<UNetConfig> {
    infer_unet_under(t, UNET_PREFIX, pooled_dim)
}

/// An original-format ControlNet's config (names under `p`). Whether its
/// residuals are pooled is not in the tensors: `pooled` says.
pub fn infer_controlnet(
    t: &Tensors,
    p: &str,
    pooled_dim: Option<usize>,
    pooled: bool,
) -> anyhow::Result<ControlNetConfig> {
    let unet = infer_unet_under(t, p, pooled_dim)?;
    let convs = t.count(&format!("{p}input_hint_block."));
    if convs < 2 || !convs.is_multiple_of(2) {
        bail!("unexpected ControlNet layout: {convs} convolutions in `{p}input_hint_block`");
    }
    // conv_in, then per width step a same-width and a stride-2 convolution.
    let widths = (0..convs / 2)
        .map(|j| t.dim(&format!("{p}input_hint_block.{}.weight", 4 * j), 0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ControlNetConfig {
        controlnet_conditioning_channel_order: "rgb".into(),
        conditioning_embedding_out_channels: widths,
        conditioning_channels: t.dim(&format!("{p}input_hint_block.0.weight"), 1)?,
        global_pool_conditions: pooled,
        unet,
    })
}

fn infer_unet_under(t: &Tensors, p: &str, pooled_dim: Option<usize>) -> anyhow::Result<UNetConfig> {
    let conv_in = t.shape(&format!("{p}input_blocks.0.0.weight"))?;
    if conv_in.len() != 4 {
        bail!("`{p}input_blocks.0.0.weight` has shape {conv_in:?}, expected a 4-d convolution kernel");
    }
    let levels = 1
        + (0..t.count(&format!("{p}input_blocks.")))
            .filter(|k| t.has(&format!("{p}input_blocks.{k}.0.op.weight")))
            .count();
    let blocks = t.count(&format!("{p}input_blocks."));
    if !blocks.is_multiple_of(levels) || blocks / levels < 2 {
        bail!("unexpected UNet layout: {blocks} input blocks for {levels} levels");
    }
    let l = blocks / levels - 1;
    let mut channels = Vec::new();
    let mut attention = Vec::new();
    let mut depth = Vec::new();
    let mut context_dim = None;
    let mut linear_projection = false;
    for i in 0..levels {
        let first = format!("{p}input_blocks.{}.", 1 + i * (l + 1));
        channels.push(t.dim(&format!("{first}0.out_layers.3.weight"), 0)?);
        let proj_in = format!("{first}1.proj_in.weight");
        let has = t.has(&proj_in);
        attention.push(has);
        if has {
            linear_projection = t.shape(&proj_in)?.len() == 2;
            depth.push(t.count(&format!("{first}1.transformer_blocks.")));
            context_dim = Some(t.dim(&format!("{first}1.transformer_blocks.0.attn2.to_k.weight"), 1)?);
        } else {
            depth.push(1);
        }
    }
    if !t.has(&format!("{p}middle_block.1.proj_in.weight")) {
        bail!("the UNet has no mid-block attention (`{p}middle_block.1.*`): not a Stable Diffusion UNet");
    }
    let Some(cross_attention_dim) = context_dim else {
        bail!("the UNet has no cross-attention blocks: not a Stable Diffusion UNet");
    };
    // SD 1.x UNets use 8 heads everywhere; later ones 64-wide heads (at least one: narrower blocks have a
    // single head of their whole width).
    let heads = if linear_projection {
        PerBlock::Each(channels.iter().map(|c| (c / 64).max(1)).collect())
    } else {
        PerBlock::One(8)
    };
    let down_block_types =
        attention.iter().map(|a| if *a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string()).collect();
    let up_block_types =
        attention.iter().rev().map(|a| if *a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string()).collect();
    let mut other = HashMap::new();
    let (mut addition_time_embed_dim, mut projection_class_embeddings_input_dim) = (None, None);
    if t.has(&format!("{p}label_emb.0.0.weight")) {
        let input = t.dim(&format!("{p}label_emb.0.0.weight"), 1)?;
        let Some(pooled) = pooled_dim.filter(|&d| input > d && (input - d).is_multiple_of(6)) else {
            bail!("the UNet's added embedding takes {input} inputs, which do not fit the text encoder's pooled output");
        };
        other.insert("addition_embed_type".to_string(), serde_json::json!("text_time"));
        addition_time_embed_dim = Some((input - pooled) / 6);
        projection_class_embeddings_input_dim = Some(input);
    }
    let norm_num_groups = norm_groups(&channels);
    Ok(UNetConfig {
        in_channels: conv_in[1],
        // A ControlNet has no output layer.
        out_channels: t.dim(&format!("{p}out.2.weight"), 0).unwrap_or(conv_in[1]),
        block_out_channels: channels,
        down_block_types,
        up_block_types,
        layers_per_block: l,
        cross_attention_dim,
        attention_head_dim: heads,
        num_attention_heads: None,
        norm_num_groups,
        norm_eps: 1e-5,
        use_linear_projection: linear_projection,
        // As SD 2.1 needs in f16 (only more exact for others); nothing changes in f32.
        upcast_attention: linear_projection,
        addition_time_embed_dim,
        projection_class_embeddings_input_dim,
        transformer_layers_per_block: PerBlock::Each(depth),
        flip_sin_to_cos: true,
        freq_shift: 0,
        time_cond_proj_dim: t.shape(&format!("{p}time_embed.cond_proj.weight")).ok().map(|s| s[1]),
        other,
    })
}

/// GroupNorm's group count, which checkpoints do not record: 32, as in every
/// SD UNet and VAE, or the narrowest block's width where that is below 32
/// (tiny test models: one group per channel).
fn norm_groups(widths: &[usize]) -> usize {
    widths.iter().copied().fold(32, usize::min)
}

/// The VAE's config from an LDM checkpoint (scaling factor: the family's).
pub fn infer_vae(t: &Tensors, scaling_factor: f64, shift_factor: Option<f64>) -> anyhow::Result<VaeConfig> {
    let p = VAE_PREFIX;
    let levels = t.count(&format!("{p}decoder.up."));
    if levels == 0 {
        bail!("no VAE decoder (`{p}decoder.up.*`) in the checkpoint");
    }
    let block_out_channels: Vec<usize> = (0..levels)
        .map(|i| t.dim(&format!("{p}decoder.up.{i}.block.0.conv2.weight"), 0))
        .collect::<anyhow::Result<_>>()?;
    Ok(VaeConfig {
        norm_num_groups: norm_groups(&block_out_channels),
        in_channels: t.dim(&format!("{p}encoder.conv_in.weight"), 1)?,
        out_channels: t.dim(&format!("{p}decoder.conv_out.weight"), 0)?,
        latent_channels: t.dim(&format!("{p}decoder.conv_in.weight"), 1)?,
        block_out_channels,
        layers_per_block: t.count(&format!("{p}decoder.up.0.block.")) - 1,
        scaling_factor,
        shift_factor,
        // SD 3's VAE has neither 1×1 convolution.
        use_quant_conv: t.has(&format!("{p}quant_conv.weight")),
        use_post_quant_conv: t.has(&format!("{p}post_quant_conv.weight")),
        other: Default::default(),
    })
}

/// The CLIP text encoder's config from a checkpoint whose text-model names
/// start with `prefix`. Heads are 64 wide, as in every SD text encoder.
pub fn infer_clip(t: &Tensors, prefix: &str, act: Activation) -> anyhow::Result<ClipConfig> {
    let (vocab, hidden) = token_table(t, &format!("{prefix}embeddings.token_embedding.weight"))?;
    Ok(ClipConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: t.dim(&format!("{prefix}encoder.layers.0.mlp.fc1.weight"), 0)?,
        num_hidden_layers: t.count(&format!("{prefix}encoder.layers.")),
        num_attention_heads: hidden / 64,
        max_position_embeddings: t.dim(&format!("{prefix}embeddings.position_embedding.weight"), 0)?,
        hidden_act: act,
        layer_norm_eps: 1e-5,
        projection_dim: None,
    })
}

/// The config of an OpenCLIP text tower under `p`, as a CLIP text model of
/// all its blocks but the last `skip`. SD 2.x conditions on the penultimate
/// block's output (then `ln_final`), so it skips the last block (left
/// unused); SDXL needs them all for its pooled output.
pub fn infer_openclip(t: &Tensors, p: &str, skip: usize) -> anyhow::Result<ClipConfig> {
    let (vocab, hidden) = token_table(t, &format!("{p}token_embedding.weight"))?;
    let blocks = t.count(&format!("{p}transformer.resblocks."));
    if blocks < 2 {
        bail!("the OpenCLIP text encoder has {blocks} blocks; at least 2 are needed (the penultimate conditions)");
    }
    Ok(ClipConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: t.dim(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
        num_hidden_layers: blocks - skip,
        num_attention_heads: hidden / 64,
        max_position_embeddings: t.dim(&format!("{p}positional_embedding"), 0)?,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-5,
        // open_clip keeps the projection as a `[D, P]` matrix (SDXL's bigG).
        projection_dim: t.shape(&format!("{p}text_projection")).ok().and_then(|s| s.get(1).copied()),
    })
}

/// Vocabulary size and width of a text encoder's token table (heads are 64
/// wide in every SD text encoder, so the width must be a multiple of 64).
fn token_table(t: &Tensors, name: &str) -> anyhow::Result<(usize, usize)> {
    match *t.shape(name)? {
        [vocab, hidden] if hidden % 64 == 0 => Ok((vocab, hidden)),
        [_, hidden] => bail!("text encoder width {hidden} is not a multiple of 64"),
        ref other => bail!("`{name}` has shape {other:?}, expected 2 dims"),
    }
}

/// One attention's q, k, v (fused in `qkv`), QK norms and output, SD 3's names.
const MMDIT_ATTENTION: &[(&str, &str, Transform)] = &[
    ("to_q.", "qkv.", Transform::Rows { index: 0, parts: 3 }),
    ("to_k.", "qkv.", Transform::Rows { index: 1, parts: 3 }),
    ("to_v.", "qkv.", Transform::Rows { index: 2, parts: 3 }),
    ("norm_q.", "ln_q.", Keep),
    ("norm_k.", "ln_k.", Keep),
    ("to_out.0.", "proj.", Keep),
];
const MMDIT_MLP: &[(&str, &str, Transform)] = &[("net.0.proj.", "fc1.", Keep), ("net.2.", "fc2.", Keep)];
const QKV: [Transform; 3] = [
    Transform::Rows { index: 0, parts: 3 },
    Transform::Rows { index: 1, parts: 3 },
    Transform::Rows { index: 2, parts: 3 },
];
const ROWS_0: &[(&str, &str, Transform)] = &[("", "", QKV[0])];
const ROWS_1: &[(&str, &str, Transform)] = &[("", "", QKV[1])];
const ROWS_2: &[(&str, &str, Transform)] = &[("", "", QKV[2])];
const SWAPPED: &[(&str, &str, Transform)] = &[("", "", Transform::SwapHalves)];

/// SD 3's MMDiT in the official single files' names under `p`: the
/// embedders (`x_`, `t_`, `y_embedder`), `joint_blocks.N.{x,context}_block`
/// with fused q/k/v, and `final_layer`, whose adaLN (like the last context
/// block's) stores (shift, scale) where diffusers has (scale, shift).
pub fn mmdit_names(cfg: &MmditConfig, p: &str) -> NameMap {
    let mut rules = vec![
        rule("pos_embed.proj.".into(), format!("{p}x_embedder.proj."), &[]),
        rule("pos_embed.pos_embed".into(), format!("{p}pos_embed"), &[]),
        rule("time_text_embed.timestep_embedder.linear_1.".into(), format!("{p}t_embedder.mlp.0."), &[]),
        rule("time_text_embed.timestep_embedder.linear_2.".into(), format!("{p}t_embedder.mlp.2."), &[]),
        rule("time_text_embed.text_embedder.linear_1.".into(), format!("{p}y_embedder.mlp.0."), &[]),
        rule("time_text_embed.text_embedder.linear_2.".into(), format!("{p}y_embedder.mlp.2."), &[]),
        rule("context_embedder.".into(), format!("{p}context_embedder."), &[]),
        rule("norm_out.linear.".into(), format!("{p}final_layer.adaLN_modulation.1."), SWAPPED),
        rule("proj_out.".into(), format!("{p}final_layer.linear."), &[]),
    ];
    for i in 0..cfg.num_layers {
        let (m, x, c) = (
            format!("transformer_blocks.{i}."),
            format!("{p}joint_blocks.{i}.x_block."),
            format!("{p}joint_blocks.{i}.context_block."),
        );
        let last = i + 1 == cfg.num_layers;
        rules.extend([
            rule(format!("{m}norm1.linear."), format!("{x}adaLN_modulation.1."), &[]),
            rule(
                format!("{m}norm1_context.linear."),
                format!("{c}adaLN_modulation.1."),
                if last { SWAPPED } else { &[] },
            ),
            rule(format!("{m}attn."), format!("{x}attn."), MMDIT_ATTENTION),
            rule(format!("{m}attn.add_q_proj."), format!("{c}attn.qkv."), ROWS_0),
            rule(format!("{m}attn.add_k_proj."), format!("{c}attn.qkv."), ROWS_1),
            rule(format!("{m}attn.add_v_proj."), format!("{c}attn.qkv."), ROWS_2),
            rule(format!("{m}attn.norm_added_q."), format!("{c}attn.ln_q."), &[]),
            rule(format!("{m}attn.norm_added_k."), format!("{c}attn.ln_k."), &[]),
            rule(format!("{m}attn.to_add_out."), format!("{c}attn.proj."), &[]),
            rule(format!("{m}attn2."), format!("{x}attn2."), MMDIT_ATTENTION),
            rule(format!("{m}ff."), format!("{x}mlp."), MMDIT_MLP),
            rule(format!("{m}ff_context."), format!("{c}mlp."), MMDIT_MLP),
        ]);
    }
    NameMap::new(rules)
}

/// The MMDiT's config from an official single file (names under `p`):
/// heads are as wide as the QK norms (64 without them, as SD 3.0).
pub fn infer_mmdit(t: &Tensors, p: &str) -> anyhow::Result<MmditConfig> {
    let proj = t.shape(&format!("{p}x_embedder.proj.weight"))?;
    let [inner, in_channels, patch, _] = *proj else {
        bail!("`{p}x_embedder.proj.weight` has shape {proj:?}, expected a 4-d convolution kernel");
    };
    if patch == 0 {
        bail!("`{p}x_embedder.proj.weight` has shape {proj:?}: an empty patch");
    }
    let layers = t.count(&format!("{p}joint_blocks."));
    let head = t.dim(&format!("{p}joint_blocks.0.x_block.attn.ln_q.weight"), 0).unwrap_or(64);
    if layers == 0 || head == 0 || !inner.is_multiple_of(head) {
        bail!("unexpected MMDiT layout: {layers} blocks, width {inner}, heads of {head}");
    }
    let positions = t.dim(&format!("{p}pos_embed"), 1)?;
    let side = (positions as f64).sqrt() as usize;
    if side * side != positions {
        bail!("`{p}pos_embed` holds {positions} positions, not a square grid");
    }
    Ok(MmditConfig {
        patch_size: patch,
        in_channels,
        out_channels: t.dim(&format!("{p}final_layer.linear.weight"), 0)? / (patch * patch),
        num_layers: layers,
        attention_head_dim: head,
        num_attention_heads: inner / head,
        joint_attention_dim: t.dim(&format!("{p}context_embedder.weight"), 1)?,
        caption_projection_dim: inner,
        pooled_projection_dim: t.dim(&format!("{p}y_embedder.mlp.0.weight"), 1)?,
        pos_embed_max_size: side,
        dual_attention_layers: (0..layers)
            .filter(|i| t.has(&format!("{p}joint_blocks.{i}.x_block.attn2.qkv.weight")))
            .collect(),
        qk_norm: t.has(&format!("{p}joint_blocks.0.x_block.attn.ln_q.weight")).then(|| "rms_norm".to_string()),
    })
}

/// A T5 encoder's config from its tensors (transformers names under `p`;
/// the token table as `shared` or `encoder.embed_tokens`).
pub fn infer_t5(t: &Tensors, p: &str) -> anyhow::Result<T5Config> {
    let table = [format!("{p}shared.weight"), format!("{p}encoder.embed_tokens.weight")]
        .into_iter()
        .find(|n| t.has(n))
        .with_context(|| format!("no T5 token table (`{p}shared.weight`)"))?;
    let (vocab, d_model) = (t.dim(&table, 0)?, t.dim(&table, 1)?);
    let block = format!("{p}encoder.block.0.layer.");
    let heads = t.dim(&format!("{block}0.SelfAttention.relative_attention_bias.weight"), 1)?;
    Ok(T5Config {
        vocab_size: vocab,
        d_model,
        d_kv: t.dim(&format!("{block}0.SelfAttention.q.weight"), 0)? / heads.max(1),
        d_ff: t.dim(&format!("{block}1.DenseReluDense.wi_0.weight"), 0)?,
        num_layers: t.count(&format!("{p}encoder.block.")),
        num_heads: heads,
        relative_attention_num_buckets: t.dim(&format!("{block}0.SelfAttention.relative_attention_bias.weight"), 0)?,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
    })
}

/// The names of a checkpoint outside the parts sdgen loads, grouped by their
/// first two components (`` `double_blocks.0.*` (24) ``), at most five groups.
pub fn unexpected(t: &Tensors) -> String {
    // The model's parts, and the training state LDM checkpoints carry.
    const KNOWN: &[&str] = &[
        UNET_PREFIX,
        VAE_PREFIX,
        "cond_stage_model.",
        "conditioner.embedders.",
        "model_ema.",
        "betas",
        "alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_",
        "posterior_",
        "logvar",
        "lvlb_weights",
    ];
    let mut groups = std::collections::BTreeMap::<String, usize>::new();
    for name in t.names().filter(|n| !KNOWN.iter().any(|k| n.starts_with(k))) {
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        let group = if parts.len() > 2 { format!("{}.{}.*", parts[0], parts[1]) } else { name.clone() };
        *groups.entry(group).or_default() += 1;
    }
    if groups.is_empty() {
        return "none; the text encoder is missing".into();
    }
    let mut list: Vec<String> = groups.iter().take(5).map(|(g, n)| format!("`{g}` ({n})")).collect();
    if groups.len() > 5 {
        list.push(format!("and {} more groups", groups.len() - 5));
    }
    list.join(", ")
}
