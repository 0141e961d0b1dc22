//! The `bank` example (deployed as type `account`): money moves between accounts as
//! a saga of messages, so no operation ever touches two accounts at once.
//!
//! `transfer` debits this account and messages the other one to `credit`; the
//! receiver either credits and answers `settled`, or — if it is closed — answers
//! `refund`, and the sender puts the money back (the compensation). Each message is
//! processed effectively once, so the total money in the system never changes.
//! See README.md.

use conflux_sdk::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// One account. Its state is the struct itself, stored under `$self`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    pub balance: i64,
    pub closed: bool,
    next_transfer: u64,
    /// Transfers this account started, by transfer id.
    pub outgoing: BTreeMap<String, Outgoing>,
    /// Transfer ids this account was credited for.
    pub credited: BTreeSet<String>,
}

/// A transfer out of an account and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub to: String,
    pub amount: i64,
    pub status: TransferStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Debited here; the credit message is on its way.
    Pending,
    /// The other account credited it.
    Completed,
    /// The other account refused it and the money came back.
    Refunded,
}

/// The `transfer` request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Transfer {
    pub to: String,
    pub amount: i64,
}

/// The `credit` message one account sends another.
#[derive(Debug, Serialize, Deserialize)]
pub struct Credit {
    pub transfer_id: String,
    pub amount: i64,
}

/// The sending account, for operations only accounts may send.
fn calling_account(op: &str) -> Result<String, Error> {
    match context::caller() {
        Some(c) if c.entity_type == Account::TYPE_NAME => Ok(c.id),
        _ => Err(Error::bad_request(format!("'{op}' is sent by another account, not called directly"))),
    }
}

#[entity]
impl Account {
    /// Adds money from outside the bank; returns the new balance.
    pub fn deposit(&mut self, amount: i64) -> Result<i64, Error> {
        if amount <= 0 {
            return Err(Error::bad_request("a deposit must be positive"));
        }
        if self.closed {
            return Err(Error::failed("the account is closed"));
        }
        self.balance = self.balance.checked_add(amount).ok_or_else(|| Error::failed("balance would overflow"))?;
        Ok(self.balance)
    }

    pub fn balance(&self) -> i64 {
        self.balance
    }

    /// Debits `amount` and sends it to account `to`. Returns the transfer id.
    pub fn transfer(&mut self, t: Transfer) -> Result<String, Error> {
        let me = context::self_ref().id;
        if t.amount <= 0 {
            return Err(Error::bad_request("a transfer must be positive"));
        }
        if t.to == me || t.to.is_empty() {
            return Err(Error::bad_request("transfer to another account"));
        }
        if self.closed {
            return Err(Error::failed("the account is closed"));
        }
        if self.balance < t.amount {
            return Err(Error::failed(format!("insufficient funds: balance {} < {}", self.balance, t.amount)));
        }
        self.next_transfer += 1;
        let transfer_id = format!("{me}:{}", self.next_transfer);
        self.balance -= t.amount;
        let out = Outgoing { to: t.to.clone(), amount: t.amount, status: TransferStatus::Pending };
        self.outgoing.insert(transfer_id.clone(), out);
        Account::send_to(t.to).credit(&Credit { transfer_id: transfer_id.clone(), amount: t.amount })?;
        Ok(transfer_id)
    }

    /// (From another account.) Takes the money, or sends it back if closed.
    pub fn credit(&mut self, c: Credit) -> Result<(), Error> {
        let from = calling_account("credit")?;
        if self.closed {
            log::info(&format!("refusing transfer {} from {from}: closed", c.transfer_id));
            return Account::send_to(from).refund(&c.transfer_id);
        }
        if self.credited.insert(c.transfer_id.clone()) {
            self.balance += c.amount;
        }
        Account::send_to(from).settled(&c.transfer_id)
    }

    /// (From the receiving account.) The transfer arrived.
    pub fn settled(&mut self, transfer_id: String) -> Result<(), Error> {
        calling_account("settled")?;
        self.finish(&transfer_id, TransferStatus::Completed)
    }

    /// (From the receiving account.) The transfer was refused: put the money back.
    pub fn refund(&mut self, transfer_id: String) -> Result<(), Error> {
        calling_account("refund")?;
        self.finish(&transfer_id, TransferStatus::Refunded)
    }

    /// Closes the account: it keeps its balance but refuses deposits, transfers and credits.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Everything about the account, for audits and tests.
    pub fn statement(&self) -> &Self {
        self
    }
}

impl Account {
    fn finish(&mut self, transfer_id: &str, status: TransferStatus) -> Result<(), Error> {
        let Some(t) = self.outgoing.get_mut(transfer_id) else {
            return Err(Error::failed(format!("unknown transfer {transfer_id}")));
        };
        if t.status == TransferStatus::Pending {
            t.status = status;
            if status == TransferStatus::Refunded {
                self.balance += t.amount;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::{SentMessage, TestHarness};

    fn account(id: &str) -> TestHarness {
        TestHarness::new("account", id)
    }

    /// Delivers `m` to `to` as a message from `from`.
    fn deliver(to: &mut TestHarness, from: &str, m: &SentMessage) -> Result<Vec<u8>, Error> {
        to.set_caller(Some(EntityRef::new("account", from)));
        to.invoke::<Account>(&m.operation, &m.payload)
    }

    #[test]
    fn a_transfer_debits_credits_and_settles() {
        let (mut a, mut b) = (account("a"), account("b"));
        a.call::<Account, _, i64>("deposit", &100).unwrap();
        let id: String = a.call::<Account, _, String>("transfer", &Transfer { to: "b".into(), amount: 30 }).unwrap();
        assert_eq!(a.entity::<Account>().balance, 70);
        let credit = a.take_sent().remove(0);
        assert_eq!((credit.target.id.as_str(), credit.operation.as_str()), ("b", "credit"));
        deliver(&mut b, "a", &credit).unwrap();
        assert_eq!(b.entity::<Account>().balance, 30);
        let settled = b.take_sent().remove(0);
        deliver(&mut a, "b", &settled).unwrap();
        assert_eq!(a.entity::<Account>().outgoing[&id].status, TransferStatus::Completed);
    }

    #[test]
    fn a_closed_account_refunds_and_money_is_conserved() {
        let (mut a, mut b) = (account("a"), account("b"));
        a.call::<Account, _, i64>("deposit", &50).unwrap();
        b.call::<Account, _, ()>("close", &()).unwrap();
        let id: String = a.call::<Account, _, String>("transfer", &Transfer { to: "b".into(), amount: 50 }).unwrap();
        deliver(&mut b, "a", &a.take_sent()[0]).unwrap();
        let refund = b.take_sent().remove(0);
        assert_eq!(refund.operation, "refund");
        deliver(&mut a, "b", &refund).unwrap();
        let st = a.entity::<Account>();
        assert_eq!((st.balance, st.outgoing[&id].status), (50, TransferStatus::Refunded));
        assert_eq!(b.entity::<Account>().balance, 0);
    }

    #[test]
    fn bad_transfers_are_refused_and_send_nothing() {
        let mut a = account("a");
        a.call::<Account, _, i64>("deposit", &10).unwrap();
        for t in [
            Transfer { to: "b".into(), amount: 11 },
            Transfer { to: "a".into(), amount: 1 },
            Transfer { to: "b".into(), amount: 0 },
        ] {
            assert!(a.call::<Account, _, String>("transfer", &t).is_err());
        }
        assert!(a.sent().is_empty());
        assert_eq!(a.entity::<Account>().balance, 10);
        // Saga steps only come from accounts.
        assert!(matches!(a.call::<Account, _, ()>("refund", "x"), Err(Error::BadRequest(_))));
    }
}
