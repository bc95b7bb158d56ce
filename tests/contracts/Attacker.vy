# pragma version ~=0.4.3
# pragma evm-version cancun
# A trainer that tries to re-enter the market when it is paid.

interface Market:
    def settle(task_id: uint256): nonpayable
    def withdraw(): nonpayable
    def offerTrainer(task_id: uint256, server: address, memory: uint256, cpus: uint256): nonpayable

market: public(address)
task_id: public(uint256)
mode: public(uint256)  # 0 accept, 1 re-enter settle, 2 re-enter withdraw


@deploy
def __init__(market: address, task_id: uint256):
    self.market = market
    self.task_id = task_id


@external
def offer(server: address):
    extcall Market(self.market).offerTrainer(self.task_id, server, 10**9, 4)


@external
def arm(mode: uint256):
    self.mode = mode


@external
def pull():
    extcall Market(self.market).withdraw()


@external
@payable
def __default__():
    if self.mode == 1:
        extcall Market(self.market).settle(self.task_id)
    elif self.mode == 2:
        extcall Market(self.market).withdraw()
