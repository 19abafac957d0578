"""The blog tutorial's program as it writes it, made repeatable: python tutorial.py [--epochs 20]

Its imports, transforms, DataLoader, NoteModel, loss, Adam, loop and prints, with only what makes a
run repeatable and offline added (each marked "added"): a seed, a seeded DataLoader generator, one
thread, --epochs, the bundled data folder, a folder of its own (tutorial_run/, so that train.py's
files are never overwritten), and a state_dict saved each epoch. With one thread,
`python train.py` gives bit-identical weights after every epoch (a test holds it).
This is the project's one copy of the tutorial's code: bench.py times it and the tests compare with it.
"""

import os

import commands  # added: the flags answered before torch loads, and errors as one line


def parse_args(argv):  # added: the flags
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=commands.bounded_int(1, 1_000_000), default=20)
    parser.add_argument("--seed", type=commands.bounded_int(0, 2**63 - 1), default=1)
    commands.add_data_dir_flag(parser)
    parser.add_argument("--checkpoint-dir", default="tutorial_run",
                        help="a folder of its own, so that train.py's noteLearning_*.pth are never overwritten")
    return parser.parse_args(argv)


if __name__ == "__main__":  # added: the flags first
    commands.flags_first(parse_args)

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import data_files  # added: the bundled MNIST, decompressed where torchvision looks for it


class NoteModel(nn.Module):
    def __init__(self):
        super(NoteModel, self).__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def make_loaders(data_dir, seed):
    """The tutorial's datasets and loaders: ToTensor, Normalize((0.5,), (0.5,)), batches of 64, shuffled."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train_dataset = datasets.MNIST(root=data_dir, train=True, transform=transform)
    test_dataset = datasets.MNIST(root=data_dir, train=False, transform=transform)
    train_loader = DataLoader(train_dataset, batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))  # added: a seeded shuffle
    test_loader = DataLoader(test_dataset, batch_size=1000, shuffle=False)
    return train_loader, test_loader


def make_model(seed):
    """The tutorial's model, loss and optimizer."""
    torch.manual_seed(seed)  # added: the same initial weights every run
    model = NoteModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)
    return model, criterion, optimizer


def train_step(model, criterion, optimizer, images, labels):
    """One step as the tutorial writes it; the loss is read every step (loss.item())."""
    optimizer.zero_grad()
    outputs = model(images)
    loss = criterion(outputs, labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def accuracy(model, test_loader):
    """Test accuracy in percent, as the tutorial counts it."""
    model.eval()
    correct = 0
    total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


def main(argv=None):
    def body(argv):  # added: one thread, the bundled data, its own folder
        args = parse_args(argv)
        data_files.load(args.data_dir, download=False)  # decompress the bundled files
        data_files.require_decompressed(args.data_dir)  # torchvision reads only those
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        with commands.torch_threads(1), torch.random.fork_rng():  # as train.py; the global generator given back
            return run(args)
    return commands.run_main(body, argv)


def run(args):
    """The tutorial's program: train, print the loss every 100 steps, test and save after each epoch."""
    train_loader, test_loader = make_loaders(args.data_dir, args.seed)
    model, criterion, optimizer = make_model(args.seed)
    for epoch in range(args.epochs):
        model.train()
        running_loss = 0.0
        for i, (images, labels) in enumerate(train_loader):
            running_loss += train_step(model, criterion, optimizer, images, labels)
            if (i + 1) % 100 == 0:
                print(f"Epoch [{epoch + 1}/{args.epochs}], Step [{i + 1}/{len(train_loader)}], "
                      f"Loss: {running_loss / 100:.4f}")
                running_loss = 0.0
        print(f"Epoch [{epoch + 1}/{args.epochs}], Test Accuracy: {accuracy(model, test_loader):.2f}%")
        torch.save(model.state_dict(), os.path.join(args.checkpoint_dir, f"noteLearning_{epoch + 1}.pth"))
    return 0


if __name__ == "__main__":
    commands.script(main)
