"""torchvision's two ResNet blocks with IBN-b's InstanceNorm between the residual sum and the ReLU
(an ``IN`` attribute the backbone sets).  A module of its own so that torchvision is imported only
when a ResNet is built, and the classes stay importable by name (a model pickles)."""
from __future__ import annotations

from torchvision.models.resnet import BasicBlock, Bottleneck


class BasicBlockIN(BasicBlock):
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.IN(out + identity))


class BottleneckIN(Bottleneck):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.IN(out + identity))


WITH_IN = {BasicBlock: BasicBlockIN, Bottleneck: BottleneckIN}
