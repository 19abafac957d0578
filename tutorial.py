"""The blog tutorial's program as it writes it, made repeatable: python tutorial.py [--epochs 20]

Its imports, transforms, DataLoader, NoteModel, loss, Adam, loop and prints, with only what makes a
run repeatable and offline added (each marked "added"): a seed, a seeded DataLoader generator, one
thread, --epochs, the bundled data folder, and a state_dict saved each epoch. With one thread,
`python train.py` gives bit-identical weights after every epoch (a test holds it).
This is the project's one copy of the tutorial's code: bench.py times it and the tests compare with it.
"""

import argparse
import os

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # added: the flags
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=data_files.DEFAULT_DATA_DIR)
    parser.add_argument("--checkpoint-dir", default=".")
    args = parser.parse_args(None if argv is None else [str(arg) for arg in argv])
    data_files.load(args.data_dir, download=False)  # added: decompress the bundled files
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # added: one thread, as train.py (the matmuls round differently on more)
    try:
        with torch.random.fork_rng():  # added: torch's global generator given back as it was
            return run(args)
    finally:
        torch.set_num_threads(threads)


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
    raise SystemExit(main())
