"""The blog tutorial's program as the blog writes it, made repeatable: python tutorial.py [--epochs 20]

Its imports, device line, transforms, datasets, `train_loader` and `text_loader`, NoteModel, loss,
Adam, loop and Chinese prints, in the blog's order and words, and `torch.save(model, ...)` as the
blog saves. Only what makes a run repeatable and offline is added, each marked "added": a seed, a
seeded DataLoader generator, one thread, --epochs, --device, the bundled data folder, and a folder
of its own (tutorial_run/, so that train.py's files are never overwritten). With one thread on the
CPU, `python train.py` gives bit-identical weights after every epoch (a test holds it). Its files
pickle the whole model: read them with `evaluate.py --trust-pickle`.
"""

from torchvision import datasets, transforms
from torch.utils import data
import torch.nn as nn
import torch.nn.functional as F
import torch

import os  # added: the output folder

from mnist_mlp_tools import commands  # added: the flags, errors as one line, Ctrl-C as exit 130
from mnist_mlp_tools import data_files  # added: the bundled MNIST, decompressed where torchvision looks for it


def blog_data(args):
    """The blog's program, line for line, up to NoteModel: the device and the data."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device) if args.device else device  # added: --device
    print(device)
    torch.manual_seed(args.seed)  # added: the same initial weights every run

    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,))  # 归一化的操作
    ])

    train_dataset = datasets.MNIST(args.data_dir, transform=transform, train=True, download=True)  # added: data dir
    text_dataset = datasets.MNIST(args.data_dir, transform=transform, train=False, download=True)

    batch_size = 64
    train_loader = data.DataLoader(dataset=train_dataset, batch_size=batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(args.seed))  # added: a seeded shuffle
    text_loader = data.DataLoader(dataset=text_dataset, batch_size=batch_size)
    return device, train_loader, text_loader  # added: handed to blog_training, below NoteModel as in the blog


class NoteModel(nn.Module):

    def __init__(self):
        super(NoteModel, self).__init__()
        self.fc1 = nn.Linear(28 * 28, 128)  # 一开始需要预估隐藏神经元的数量
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        out = x.view(-1, 28 * 28)  # 将输入的图像展开成一维向量
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        out = self.fc3(out)  # # 输出层，不应用激活函数（在交叉熵损失函数中包含了softmax操作）
        return out


def blog_training(args, device, train_loader, text_loader):
    """The blog's program, line for line, from NoteModel on: the model, the loss, Adam and the loop."""
    model = NoteModel().to(device)

    loss_fn = nn.CrossEntropyLoss()

    opt = torch.optim.Adam(model.parameters(), lr=0.001)

    total_train_step = 0
    epoch = args.epochs  # added: --epochs (the blog: 20)
    for i in range(epoch):
        print('-------------------第{}轮训练开始-------------------'.format(i + 1))
        for inputs, labels in train_loader:
            inputs, labels = inputs.to(device), labels.to(device)
            outs = model(inputs)
            loss = loss_fn(outs, labels)  # 获取一个小批次的平均损失值
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_train_step += 1
            if total_train_step % 100 == 0:
                print("训练次数{}，loss:{}".format(total_train_step, loss.item()))
        print('第{}轮训练结束！loss:{}'.format(i + 1, loss.item()))
        total_text_step = 0
        correct = 0
        print('-------------------第{}轮测试开始----------------'.format(i + 1))
        with torch.no_grad():
            for inputs, labels in text_loader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                _, predicted = torch.max(outputs.data, 1)
                total_text_step += labels.size(0)
                correct += (predicted == labels).sum().item()

            accuracy = (correct / total_text_step) * 100
            print(f'测试数据成功的概率为: {accuracy:.2f}%')
        torch.save(model, os.path.join(args.checkpoint_dir, 'noteLearning_{}.pth'.format(i + 1)))  # added: its folder
        print('第{}训练轮模型已保存！'.format(i + 1))
    return 0


def parse_args(argv):  # added: the flags
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=commands.bounded_int(1, 1_000_000), default=20, help="the blog's epoch = 20")
    parser.add_argument("--seed", type=commands.bounded_int(0, 2**63 - 1), default=1,
                        help="seed for the weights and the shuffle (the blog sets none)")
    parser.add_argument("--device", default=None, help="the blog's: cuda if available, else cpu")
    commands.add_data_dir_flag(parser)
    parser.add_argument("--checkpoint-dir", default="tutorial_run",
                        help="a folder of its own, so that train.py's noteLearning_*.pth are never overwritten")
    return parser.parse_args(argv)


def main(argv=None):
    def body(argv):  # added: one thread, the bundled data, its own folder
        args = parse_args(argv)
        data_files.load(args.data_dir, download=False)  # decompress the bundled files
        data_files.require_decompressed(args.data_dir)  # torchvision reads only those
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        with commands.torch_threads(1), torch.random.fork_rng():  # as train.py; the global generator given back
            return blog_training(args, *blog_data(args))
    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
