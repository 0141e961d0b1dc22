//! The `bank` example (deployed as type `account`): money moves between accounts as
//! a saga over asks, so no operation ever touches two accounts at once.
//!
//! `transfer` debits this account and *asks* the other one to `credit`; the
//! receiver either credits (its reply) or, if it is closed, refuses. The reply
//! runs this account's continuation `on_credit`, which completes the transfer or
//! puts the money back (the compensation). The ask and its reply are each
//! processed effectively once, so the total money in the system never changes.
//! See README.md.

use conflux_sdk::prelude::*;
use std::collections::BTreeMap;

/// One account. Its state is the struct itself, stored under `$self`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    pub balance: i64,
    pub closed: bool,
    next_transfer: u64,
    /// Transfers this account started, by transfer id.
    pub outgoing: BTreeMap<String, Outgoing>,
    /// Transfer ids this account was credited for, in order. A list, not a
    /// set: the platform delivers each ask once, and an audit would see a
    /// duplicate here (and in the books) if it did not.
    pub credited: Vec<String>,
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
    /// Debited here; the other account has not answered yet.
    Pending,
    /// The other account credited it.
    Completed,
    /// The other account refused it (or could not be asked) and the money came back.
    Refunded,
}

/// The `transfer` request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Transfer {
    pub to: String,
    pub amount: i64,
}

/// What one account asks another to `credit`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Credit {
    pub transfer_id: String,
    pub amount: i64,
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

    /// Debits `amount` and asks account `to` to credit it. Returns the transfer id.
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
        // Committed with the debit, or not at all. No timeout: a credit may land
        // after any deadline, so only the receiver's answer may decide a refund.
        Account::ask(t.to.clone())
            .credit(&Credit { transfer_id: transfer_id.clone(), amount: t.amount })
            .context(&transfer_id)
            .then(Self::ON_CREDIT)?;
        self.balance -= t.amount;
        let out = Outgoing { to: t.to, amount: t.amount, status: TransferStatus::Pending };
        self.outgoing.insert(transfer_id.clone(), out);
        Ok(transfer_id)
    }

    /// (Asked by another account.) Takes the money, or refuses if closed — and
    /// the asker puts it back.
    pub fn credit(&mut self, c: Credit) -> Result<(), Error> {
        match context::caller() {
            Some(from) if from.entity_type == Account::TYPE_NAME => {}
            _ => return Err(Error::bad_request("'credit' is asked by another account, not called directly")),
        }
        if self.closed {
            return Err(Error::failed(format!("account closed: transfer {} refused", c.transfer_id)));
        }
        if c.amount <= 0 {
            return Err(Error::bad_request("a credit must be positive"));
        }
        self.balance += c.amount;
        self.credited.push(c.transfer_id);
        Ok(())
    }

    /// The receiver's answer to a transfer's credit: completed, or refunded.
    #[continuation]
    pub fn on_credit(&mut self, reply: Result<(), AskError>, ask: AskContext) -> Result<(), Error> {
        let transfer_id: String = ask.context()?;
        let Some(t) = self.outgoing.get_mut(&transfer_id) else {
            return Err(Error::failed(format!("unknown transfer {transfer_id}")));
        };
        if t.status != TransferStatus::Pending {
            return Ok(());
        }
        match reply {
            // `()` is the only answer `credit` gives, so a reply that does not
            // parse as one still means the receiver credited.
            Ok(()) | Err(AskError::BadReply(_)) => t.status = TransferStatus::Completed,
            // The receiver's turn did not commit (it refused, its type is not
            // deployed, or it failed every attempt): nothing was credited.
            Err(e @ (AskError::Refused(_) | AskError::Undeliverable(_))) => {
                log::info(&format!("transfer {transfer_id} refunded: {e}"));
                t.status = TransferStatus::Refunded;
                self.balance += t.amount;
            }
            // Not asked with a timeout; were it, the credit could still land.
            Err(AskError::TimedOut) => log::warn(&format!("transfer {transfer_id}: timed out, left pending")),
        }
        Ok(())
    }

    /// Where transfer `id` of this account stands, or `null` if there is none.
    pub fn transfer_status(&self, id: String) -> Option<TransferStatus> {
        self.outgoing.get(&id).map(|t| t.status)
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

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    fn account(id: &str) -> TestHarness {
        TestHarness::new("account", id)
    }

    fn transfer(from: &mut TestHarness, to: &str, amount: i64) -> Result<String, Error> {
        from.call::<Account, _, String>("transfer", &Transfer { to: to.into(), amount })
    }

    #[test]
    fn a_transfer_debits_asks_for_the_credit_and_completes_on_the_reply() {
        let (mut a, mut b) = (account("a"), account("b"));
        a.call::<Account, _, i64>("deposit", &100).unwrap();
        let id = transfer(&mut a, "b", 30).unwrap();
        assert_eq!(a.entity::<Account>().balance, 70);
        assert_eq!(
            a.call::<Account, _, Option<TransferStatus>>("transfer_status", &id).unwrap(),
            Some(TransferStatus::Pending)
        );
        let ask = a.asks().remove(0);
        assert_eq!((ask.target.to_string().as_str(), ask.operation.as_str()), ("account/b", "credit"));
        a.answer::<Account, Account>(&ask.id, &mut b).unwrap();
        assert_eq!(b.entity::<Account>().balance, 30);
        assert_eq!(b.entity::<Account>().credited, vec![id.clone()]);
        assert_eq!(a.entity::<Account>().outgoing[&id].status, TransferStatus::Completed);
        assert_eq!(a.entity::<Account>().balance, 70);
    }

    #[test]
    fn a_closed_account_refuses_and_the_money_comes_back() {
        let (mut a, mut b) = (account("a"), account("b"));
        a.call::<Account, _, i64>("deposit", &50).unwrap();
        b.call::<Account, _, ()>("close", &()).unwrap();
        let id = transfer(&mut a, "b", 50).unwrap();
        assert_eq!(a.entity::<Account>().balance, 0);
        let ask = a.asks().remove(0);
        a.answer::<Account, Account>(&ask.id, &mut b).unwrap();
        let st = a.entity::<Account>();
        assert_eq!((st.balance, st.outgoing[&id].status), (50, TransferStatus::Refunded));
        assert_eq!(b.entity::<Account>().balance, 0);
        assert!(b.entity::<Account>().credited.is_empty());
    }

    #[test]
    fn an_undeliverable_credit_is_refunded_and_a_timeout_never_is() {
        let mut a = account("a");
        a.call::<Account, _, i64>("deposit", &20).unwrap();
        let gone = transfer(&mut a, "b", 5).unwrap();
        let late = transfer(&mut a, "c", 7).unwrap();
        let asks = a.asks();
        let id_of = |to: &str| asks.iter().find(|k| k.target.id == to).unwrap().id.clone();
        a.reply::<Account>(&id_of("b"), Err(AskError::Undeliverable("type 'account' is not deployed".into()))).unwrap();
        a.reply::<Account>(&id_of("c"), Err(AskError::TimedOut)).unwrap();
        let st = a.entity::<Account>();
        assert_eq!(st.outgoing[&gone].status, TransferStatus::Refunded);
        assert_eq!(
            st.outgoing[&late].status,
            TransferStatus::Pending,
            "a timeout must not refund: the credit may land"
        );
        assert_eq!(st.balance, 20 - 7);
    }

    #[test]
    fn bad_transfers_are_refused_and_ask_nothing() {
        let mut a = account("a");
        a.call::<Account, _, i64>("deposit", &10).unwrap();
        for (to, amount) in [("b", 11), ("a", 1), ("b", 0)] {
            assert!(transfer(&mut a, to, amount).is_err());
        }
        assert!(a.asks().is_empty());
        assert_eq!(a.entity::<Account>().balance, 10);
        // Credits come from accounts, and continuations only from replies.
        let credit = Credit { transfer_id: "x:1".into(), amount: 5 };
        assert!(matches!(a.call::<Account, _, ()>("credit", &credit), Err(Error::BadRequest(_))));
        assert!(matches!(a.call::<Account, _, ()>("on_credit", &()), Err(Error::BadRequest(_))));
        assert_eq!(a.entity::<Account>().balance, 10);
    }
}
