//! Spiking ResNet and SEW ResNet, node for node as spikingjelly 2.0 builds them
//! (`activation_based/model/{spiking_resnet,sew_resnet}.py`, torchvision's v1.5 layout with the
//! stride on the 3×3 conv of bottlenecks).
//!
//! Spiking ResNet block: `sn(bn(conv(…)) + shortcut)`, shortcut `bn(conv1x1(x))` when the shape
//! changes. SEW block: every conv/bn is followed by its neuron, the shortcut by its own neuron
//! (`downsample_sn`), and the two join through the connect function: `f(identity, out)` in basic
//! blocks, `f(out, identity)` in bottlenecks (the order matters for IAND).
use crate::error::Result;
use crate::graph::{Graph, Input, NodeId};
use crate::ops::batch_norm::BatchNorm2d;
use crate::ops::connect::{Add, ConnectFunction, SewConnect};
use crate::ops::conv2d::Conv2d;
use crate::ops::flatten::Flatten;
use crate::ops::linear::Linear;
use crate::ops::pool::{AdaptiveAvgPool2d, MaxPool2d};
use crate::tensor::Tensor;

use super::ModelConfig;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Family {
    Spiking,
    Sew(ConnectFunction),
}

/// spikingjelly's SEW argument order: `sew_function(identity, out)` in basic blocks,
/// `sew_function(out, identity)` in bottlenecks.
#[derive(Clone, Copy)]
enum JoinOrder {
    IdentityFirst,
    BranchFirst,
}

#[derive(Clone, Copy, PartialEq)]
enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// `None` for a depth spikingjelly does not define.
pub(super) fn build(family: Family, depth: usize, config: &ModelConfig) -> Option<Result<Graph>> {
    let (block, layers) = match depth {
        18 => (Block::Basic, [2, 2, 2, 2]),
        34 => (Block::Basic, [3, 4, 6, 3]),
        50 => (Block::Bottleneck, [3, 4, 6, 3]),
        101 => (Block::Bottleneck, [3, 4, 23, 3]),
        152 => (Block::Bottleneck, [3, 8, 36, 3]),
        _ => return None,
    };
    Some(
        Builder {
            family,
            config,
            g: Graph::new(Input {
                dims: vec![None, None, Some(3), None, None],
            }),
        }
        .resnet(block, layers),
    )
}

struct Builder<'a> {
    family: Family,
    config: &'a ModelConfig,
    g: Graph,
}

impl Builder<'_> {
    fn resnet(mut self, block: Block, layers: [usize; 4]) -> Result<Graph> {
        let x = self.g.input_id();
        let x = self.conv(x, "conv1", 3, 64, 7, 2)?;
        let x = self.bn(x, "bn1", 64)?;
        let x = self.neuron(x, "sn1")?;
        let x = self
            .g
            .add("maxpool", MaxPool2d::new((3, 3), (2, 2), (1, 1))?, &[x])?;
        let mut inplanes = 64;
        let mut x = x;
        for (i, &blocks) in layers.iter().enumerate() {
            let planes = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            for j in 0..blocks {
                let prefix = format!("layer{}.{j}", i + 1);
                let s = if j == 0 { stride } else { 1 };
                x = match block {
                    Block::Basic => self.basic(x, &prefix, inplanes, planes, s)?,
                    Block::Bottleneck => self.bottleneck(x, &prefix, inplanes, planes, s)?,
                };
                inplanes = planes * block.expansion();
            }
        }
        let x = self
            .g
            .add("avgpool", AdaptiveAvgPool2d::new((1, 1))?, &[x])?;
        let x = self.g.add("flatten", Flatten { start_dim: 2 }, &[x])?;
        let fc = Linear::new(
            Tensor::zeros(vec![self.config.num_classes, inplanes]),
            Some(Tensor::zeros(vec![self.config.num_classes])),
        )?;
        let x = self.g.add("fc", fc, &[x])?;
        self.g.set_output(x)?;
        Ok(self.g)
    }

    fn basic(
        &mut self,
        x: NodeId,
        p: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
    ) -> Result<NodeId> {
        let out = self.conv(x, &format!("{p}.conv1"), inplanes, planes, 3, stride)?;
        let out = self.bn(out, &format!("{p}.bn1"), planes)?;
        let out = self.neuron(out, &format!("{p}.sn1"))?;
        let out = self.conv(out, &format!("{p}.conv2"), planes, planes, 3, 1)?;
        let out = self.bn(out, &format!("{p}.bn2"), planes)?;
        let identity = self.shortcut(x, p, inplanes, planes, stride)?;
        self.join(p, out, identity, "sn2", JoinOrder::IdentityFirst)
    }

    fn bottleneck(
        &mut self,
        x: NodeId,
        p: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
    ) -> Result<NodeId> {
        let width = planes; // groups = 1, width_per_group = 64
        let outplanes = planes * Block::Bottleneck.expansion();
        let out = self.conv(x, &format!("{p}.conv1"), inplanes, width, 1, 1)?;
        let out = self.bn(out, &format!("{p}.bn1"), width)?;
        let out = self.neuron(out, &format!("{p}.sn1"))?;
        let out = self.conv(out, &format!("{p}.conv2"), width, width, 3, stride)?;
        let out = self.bn(out, &format!("{p}.bn2"), width)?;
        let out = self.neuron(out, &format!("{p}.sn2"))?;
        let out = self.conv(out, &format!("{p}.conv3"), width, outplanes, 1, 1)?;
        let out = self.bn(out, &format!("{p}.bn3"), outplanes)?;
        let identity = self.shortcut(x, p, inplanes, outplanes, stride)?;
        self.join(p, out, identity, "sn3", JoinOrder::BranchFirst)
    }

    /// Ends a block: spiking ResNets add the shortcut to the branch and fire `last` on the sum;
    /// SEW fires `last` on the branch and joins it with the shortcut through the connect
    /// function, in the block type's argument order.
    fn join(
        &mut self,
        p: &str,
        branch: NodeId,
        identity: NodeId,
        last: &str,
        order: JoinOrder,
    ) -> Result<NodeId> {
        match self.family {
            Family::Spiking => {
                let sum = self.g.add(format!("{p}.add"), Add, &[branch, identity])?;
                self.neuron(sum, &format!("{p}.{last}"))
            }
            Family::Sew(function) => {
                let out = self.neuron(branch, &format!("{p}.{last}"))?;
                let inputs = match order {
                    JoinOrder::IdentityFirst => [identity, out],
                    JoinOrder::BranchFirst => [out, identity],
                };
                self.g
                    .add(format!("{p}.connect"), SewConnect { function }, &inputs)
            }
        }
    }

    /// The block's shortcut: `x` itself, or `downsample = Sequential(conv1x1, bn)` (followed by
    /// `downsample_sn` in SEW blocks) when the stride or channel count changes.
    fn shortcut(
        &mut self,
        x: NodeId,
        p: &str,
        inplanes: usize,
        outplanes: usize,
        stride: usize,
    ) -> Result<NodeId> {
        if stride == 1 && inplanes == outplanes {
            return Ok(x);
        }
        let d = self.conv(
            x,
            &format!("{p}.downsample.0"),
            inplanes,
            outplanes,
            1,
            stride,
        )?;
        let d = self.bn(d, &format!("{p}.downsample.1"), outplanes)?;
        match self.family {
            Family::Spiking => Ok(d),
            Family::Sew(_) => self.neuron(d, &format!("{p}.downsample_sn")),
        }
    }

    /// A bias-free conv with torchvision's padding: 3 for 7×7, 1 for 3×3, 0 for 1×1.
    fn conv(
        &mut self,
        x: NodeId,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<NodeId> {
        let conv = Conv2d::new(
            Tensor::zeros(vec![cout, cin, k, k]),
            None,
            (stride, stride),
            (k / 2, k / 2),
            (1, 1),
            1,
        )?;
        self.g.add(name, conv, &[x])
    }

    fn bn(&mut self, x: NodeId, name: &str, channels: usize) -> Result<NodeId> {
        self.g.add(name, BatchNorm2d::with_channels(channels), &[x])
    }

    fn neuron(&mut self, x: NodeId, name: &str) -> Result<NodeId> {
        let op = self.config.neuron.build()?;
        self.g.add_boxed(name.to_string(), op, &[x])
    }
}
