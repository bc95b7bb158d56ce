# pragma version ~=0.4.3
# pragma evm-version cancun
"""
A participant that is a contract: it acts through `execute` (offers, commits), and when the
market pays it, it accepts (mode 0), refuses (mode 1), or calls the market again with
`reentry` before accepting (mode 2), counting whether that call got through.
"""

market: public(address)
mode: public(uint256)
reentry: public(Bytes[1024])
reentered: public(uint256)  # calls back into the market that succeeded
blocked: public(uint256)  # calls back into the market that were refused


@deploy
def __init__(market: address):
    self.market = market


@external
@payable
def execute(target: address, data: Bytes[1024]):
    raw_call(target, data, value=msg.value)


@external
def arm(mode: uint256, reentry: Bytes[1024]):
    self.mode = mode
    self.reentry = reentry


@external
@payable
def __default__():
    if self.mode == 1:
        raise "refused"
    if self.mode == 2:
        ok: bool = raw_call(self.market, self.reentry, revert_on_failure=False)
        if ok:
            self.reentered += 1
        else:
            self.blocked += 1
