"""How the job finds its devices and processes (`topology`), lays arrays out on them (`mesh`), and runs one
train or eval step on all of them (`steps`)."""
