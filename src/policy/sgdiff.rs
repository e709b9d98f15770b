//! Security Group diff: the rules a group holds now vs a [`CloudPlan`] →
//! what to authorize, revoke and re-describe. Pure.
//!
//! ## Ownership
//!
//! Palisade revokes only rules it owns:
//! - in a group it **created** for the policy ([`GroupOwnership::Created`]),
//!   every rule is the policy's (a rule added by hand is drift and goes);
//! - in an **adopted** group ([`GroupOwnership::Adopted`]), a rule is the
//!   policy's exactly when its description starts with the policy's marker
//!   `palisade:<policy>/` ([`crate::policy::marker`]). Rules without it are
//!   never revoked, and a desired permission that such a foreign rule
//!   already grants is not authorized again (AWS would answer
//!   `InvalidPermission.Duplicate`): it is reported in
//!   [`PermissionDiff::satisfied_by_foreign`].
//!
//! The marker carries the policy name, so several policies may adopt one
//! group without revoking each other's rules. Whoever edits a description
//! edits ownership: removing the marker hands a rule over to its editor;
//! Palisade never takes a rule back silently.
//!
//! A direction the plan does not speak for (`None`) is left alone except
//! for rules carrying the policy's marker, which are revoked: the policy
//! used to speak for that direction and no longer does. The default
//! all-traffic egress rules are never revoked when the plan
//! [keeps default egress](CloudPlan::keeps_default_egress).
//!
//! ## Apply order (the contract for the cloud module)
//!
//! 1. `authorize` (both directions) — so a change never opens a window in
//!    which traffic allowed before and after is dropped;
//! 2. `update_descriptions` (in place, `ModifySecurityGroupRules`);
//! 3. `revoke` by rule id.
//!
//! Between steps 1 and 3 the group briefly holds both old and new rules;
//! the quota must leave room for that ([`SgDiff::peak_rules`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::cloud::{CloudPlan, PlannedPermission, SgPeer, SgPermission, marker};
use super::{Direction, IpFamily, PolicyError};

/// Who owns the Security Group a plan is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GroupOwnership {
    /// Palisade created the group for this policy: every rule in it is the
    /// policy's to keep or revoke.
    Created,
    /// The group existed before (`spec.securityGroup.id`): only rules whose
    /// description carries the policy's marker are the policy's.
    Adopted,
}

/// One rule as read from AWS (`DescribeSecurityGroupRules`), converted to
/// the canonical fields ([`SgPermission::from_aws`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentSgRule {
    /// `SecurityGroupRuleId` (`sgr-...`).
    pub rule_id: String,
    /// `IsEgress`.
    pub direction: Direction,
    /// Protocol, ports and peer.
    pub permission: SgPermission,
    /// `Description`, if any.
    pub description: Option<String>,
}

/// The fields of an AWS `SecurityGroupRule`, as the cloud module reads
/// them from `DescribeSecurityGroupRules` (no AWS SDK type crosses into the
/// compiler).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AwsRuleFields<'a> {
    /// `SecurityGroupRuleId`.
    pub rule_id: &'a str,
    /// `IsEgress`.
    pub is_egress: bool,
    /// `IpProtocol`.
    pub ip_protocol: &'a str,
    /// `FromPort`.
    pub from_port: Option<i32>,
    /// `ToPort`.
    pub to_port: Option<i32>,
    /// `CidrIpv4`.
    pub cidr_ipv4: Option<&'a str>,
    /// `CidrIpv6`.
    pub cidr_ipv6: Option<&'a str>,
    /// `ReferencedGroupInfo.GroupId`.
    pub referenced_group_id: Option<&'a str>,
    /// `PrefixListId`.
    pub prefix_list_id: Option<&'a str>,
    /// `Description`.
    pub description: Option<&'a str>,
}

impl CurrentSgRule {
    /// Reads one rule as AWS describes it, canonicalising its fields
    /// ([`SgPermission::from_aws`]). Fails with
    /// [`PolicyError::UnreadableSgRule`] (naming the rule id) when the peer
    /// is not exactly one of CIDR/group/prefix list or the protocol or ports
    /// are out of range; the caller should then leave the group alone
    /// rather than guess.
    pub fn from_aws(f: &AwsRuleFields<'_>) -> Result<CurrentSgRule, PolicyError> {
        let unreadable = |problem: String| PolicyError::UnreadableSgRule {
            rule_id: f.rule_id.to_string(),
            problem,
        };
        let peer = SgPeer::from_aws(
            f.cidr_ipv4,
            f.cidr_ipv6,
            f.referenced_group_id,
            f.prefix_list_id,
        )
        .map_err(unreadable)?;
        let permission = SgPermission::from_aws(f.ip_protocol, f.from_port, f.to_port, peer)
            .map_err(unreadable)?;
        Ok(CurrentSgRule {
            rule_id: f.rule_id.to_string(),
            direction: if f.is_egress {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            permission,
            description: f.description.filter(|d| !d.is_empty()).map(str::to_string),
        })
    }
}

/// Whether a rule with `description` in a group of `ownership` belongs to
/// `policy` (see the module docs). Used by the diff, and by the controller
/// to count the rules it manages.
pub fn owns_rule(policy: &str, ownership: GroupOwnership, description: Option<&str>) -> bool {
    ownership == GroupOwnership::Created || carries_marker(policy, description)
}

fn carries_marker(policy: &str, description: Option<&str>) -> bool {
    description.is_some_and(|d| d.starts_with(&marker(policy)))
}

/// A desired permission already granted by a rule the policy does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForeignMatch {
    /// The permission.
    pub permission: SgPermission,
    /// The foreign rule granting it.
    pub rule_id: String,
}

/// The changes to one direction of one group.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionDiff {
    /// Permissions to authorize, sorted, with their descriptions.
    pub authorize: Vec<PlannedPermission>,
    /// Rule ids to revoke, sorted. Only ever rules the policy owns.
    pub revoke: Vec<String>,
    /// Rule id → new description, for owned rules that stay.
    pub update_descriptions: BTreeMap<String, String>,
    /// Desired permissions granted by foreign rules (informational: nothing
    /// to do, and nothing Palisade may revoke).
    pub satisfied_by_foreign: Vec<ForeignMatch>,
}

impl PermissionDiff {
    /// True when nothing needs an API call.
    pub fn is_empty(&self) -> bool {
        self.authorize.is_empty() && self.revoke.is_empty() && self.update_descriptions.is_empty()
    }
}

/// The changes to one group, per direction.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SgDiff {
    /// Inbound changes.
    pub ingress: PermissionDiff,
    /// Outbound changes.
    pub egress: PermissionDiff,
}

impl SgDiff {
    /// True when nothing needs an API call.
    pub fn is_empty(&self) -> bool {
        self.ingress.is_empty() && self.egress.is_empty()
    }

    /// The changes of one direction.
    pub fn direction(&self, direction: Direction) -> &PermissionDiff {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Rules per family the group holds between authorize and revoke (the
    /// peak of the apply order), counting CIDRs and group references as
    /// AWS does (prefix lists count one here: their size is in the plan's
    /// quota, not in the rules). Compare with the quota to know whether the
    /// change must be split.
    pub fn peak_rules(&self, direction: Direction, current: &[CurrentSgRule]) -> (u32, u32) {
        let mut counts = (0u32, 0u32);
        let perms = current
            .iter()
            .filter(|r| r.direction == direction)
            .map(|r| &r.permission)
            .chain(
                self.direction(direction)
                    .authorize
                    .iter()
                    .map(|p| &p.permission),
            );
        for p in perms {
            for family in families(p) {
                match family {
                    IpFamily::V4 => counts.0 += 1,
                    IpFamily::V6 => counts.1 += 1,
                }
            }
        }
        counts
    }

    /// The rules a group would hold after this diff is applied in order to
    /// `current`: a model of AWS for tests and dry runs. New rules get ids
    /// `new-<n>`.
    pub fn apply_to(&self, current: &[CurrentSgRule]) -> Vec<CurrentSgRule> {
        let mut rules: Vec<CurrentSgRule> = current.to_vec();
        let mut n = 0;
        for direction in [Direction::Ingress, Direction::Egress] {
            for p in &self.direction(direction).authorize {
                n += 1;
                rules.push(CurrentSgRule {
                    rule_id: format!("new-{n}"),
                    direction,
                    permission: p.permission.clone(),
                    description: Some(p.description.clone()),
                });
            }
        }
        for rule in &mut rules {
            if let Some(desc) = self
                .direction(rule.direction)
                .update_descriptions
                .get(&rule.rule_id)
            {
                rule.description = Some(desc.clone());
            }
        }
        rules.retain(|r| !self.direction(r.direction).revoke.contains(&r.rule_id));
        rules
    }
}

fn families(p: &SgPermission) -> &'static [IpFamily] {
    match p.peer {
        SgPeer::Ipv4(_) => &[IpFamily::V4],
        SgPeer::Ipv6(_) => &[IpFamily::V6],
        _ => &[IpFamily::V4, IpFamily::V6],
    }
}

/// Compares the rules a group holds (`current`, every rule of the group,
/// both directions) with what `plan` wants.
///
/// Contract: applying the result in the documented order turns `current`
/// into a group where every desired permission is granted exactly once,
/// every owned rule is desired (or a protected default egress rule) and
/// carries the desired description, and every foreign rule is untouched.
/// Never revokes a rule [`owns_rule`] says the policy does not own. A
/// current state that already matches gives an empty diff.
pub fn diff_security_group(
    plan: &CloudPlan,
    current: &[CurrentSgRule],
    ownership: GroupOwnership,
) -> SgDiff {
    SgDiff {
        ingress: diff_direction(plan, current, ownership, Direction::Ingress),
        egress: diff_direction(plan, current, ownership, Direction::Egress),
    }
}

fn diff_direction(
    plan: &CloudPlan,
    current: &[CurrentSgRule],
    ownership: GroupOwnership,
    direction: Direction,
) -> PermissionDiff {
    let mut diff = PermissionDiff::default();
    let mut rules: Vec<&CurrentSgRule> = current
        .iter()
        .filter(|r| r.direction == direction)
        .collect();
    rules.sort();
    let protected: BTreeSet<SgPermission> =
        if direction == Direction::Egress && plan.keeps_default_egress {
            SgPermission::default_egress().into_iter().collect()
        } else {
            BTreeSet::new()
        };

    let Some(desired) = plan.permissions(direction) else {
        // Not spoken for: only rules carrying the marker were ours to write.
        diff.revoke = rules
            .iter()
            .filter(|r| {
                carries_marker(&plan.policy, r.description.as_deref())
                    && !protected.contains(&r.permission)
            })
            .map(|r| r.rule_id.clone())
            .collect();
        diff.revoke.sort();
        return diff;
    };

    // A protected rule the plan wants anyway is kept like any desired one;
    // protection only spares the copies the plan does not account for.
    let protected: BTreeSet<SgPermission> = protected
        .into_iter()
        .filter(|p| !desired.iter().any(|d| &d.permission == p))
        .collect();
    let (owned, foreign): (Vec<&CurrentSgRule>, Vec<&CurrentSgRule>) = rules
        .into_iter()
        .partition(|r| owns_rule(&plan.policy, ownership, r.description.as_deref()));
    let mut owned_by_perm: BTreeMap<&SgPermission, Vec<&CurrentSgRule>> = BTreeMap::new();
    for r in &owned {
        owned_by_perm.entry(&r.permission).or_default().push(r);
    }
    let foreign_by_perm: BTreeMap<&SgPermission, &CurrentSgRule> =
        foreign.iter().rev().map(|r| (&r.permission, *r)).collect();

    let mut kept: BTreeSet<&str> = BTreeSet::new();
    for want in desired {
        if let Some(have) = owned_by_perm
            .get(&want.permission)
            .and_then(|rs| rs.first())
        {
            kept.insert(&have.rule_id);
            if have.description.as_deref() != Some(want.description.as_str()) {
                diff.update_descriptions
                    .insert(have.rule_id.clone(), want.description.clone());
            }
        } else if let Some(have) = foreign_by_perm.get(&want.permission) {
            diff.satisfied_by_foreign.push(ForeignMatch {
                permission: want.permission.clone(),
                rule_id: have.rule_id.clone(),
            });
        } else {
            diff.authorize.push(want.clone());
        }
    }
    diff.revoke = owned
        .iter()
        .filter(|r| !kept.contains(r.rule_id.as_str()) && !protected.contains(&r.permission))
        .map(|r| r.rule_id.clone())
        .collect();
    diff.revoke.sort();
    diff.authorize.sort();
    diff
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::{PolicyMode, Protocol};
    use crate::policy::cloud::{SgPeer, SgProtocol, plan_cloud};
    use crate::policy::facts::Facts;
    use crate::policy::testing::*;
    use crate::policy::validate;

    fn tcp(port: i32, cidr: &str) -> SgPermission {
        SgPermission {
            protocol: SgProtocol::Tcp,
            from_port: port,
            to_port: port,
            peer: SgPeer::from_aws(Some(cidr), None, None, None).unwrap(),
        }
    }

    fn cur(
        id: &str,
        direction: Direction,
        permission: SgPermission,
        desc: Option<&str>,
    ) -> CurrentSgRule {
        CurrentSgRule {
            rule_id: id.into(),
            direction,
            permission,
            description: desc.map(str::to_string),
        }
    }

    fn web_plan() -> CloudPlan {
        let p = policy(
            "web",
            vec![
                rule("http", Protocol::Tcp, &[80], &["0.0.0.0/0"]),
                rule("ssh", Protocol::Tcp, &[22], &["203.0.113.0/24"]),
            ],
            None,
        );
        plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap()
    }

    #[test]
    fn rules_read_from_aws() {
        let fields = AwsRuleFields {
            rule_id: "sgr-1",
            is_egress: true,
            ip_protocol: "-1",
            cidr_ipv4: Some("0.0.0.0/0"),
            description: Some(""),
            ..Default::default()
        };
        let rule = CurrentSgRule::from_aws(&fields).unwrap();
        assert_eq!(rule.permission, SgPermission::default_egress()[0]);
        assert_eq!(
            (rule.direction, rule.description),
            (Direction::Egress, None)
        );
        let bad = AwsRuleFields {
            cidr_ipv4: None,
            ..fields
        };
        let err = CurrentSgRule::from_aws(&bad).unwrap_err();
        assert!(
            matches!(&err, PolicyError::UnreadableSgRule { rule_id, .. } if rule_id == "sgr-1"),
            "{err}"
        );
    }

    #[test]
    fn new_created_group_gets_everything() {
        let plan = web_plan();
        let diff = diff_security_group(&plan, &[], GroupOwnership::Created);
        assert_eq!(diff.ingress.authorize.len(), 2);
        assert!(diff.egress.is_empty());
    }

    #[test]
    fn adopted_group_keeps_foreign_rules_and_reports_satisfied() {
        let plan = web_plan();
        let current = vec![
            cur(
                "sgr-1",
                Direction::Ingress,
                tcp(80, "0.0.0.0/0"),
                Some("opened by ops"),
            ),
            cur("sgr-2", Direction::Ingress, tcp(8080, "0.0.0.0/0"), None),
            cur(
                "sgr-3",
                Direction::Ingress,
                tcp(23, "0.0.0.0/0"),
                Some("palisade:web/telnet"),
            ),
            cur(
                "sgr-4",
                Direction::Ingress,
                tcp(22, "203.0.113.0/24"),
                Some("palisade:web/old-name"),
            ),
            cur(
                "sgr-5",
                Direction::Ingress,
                tcp(25, "0.0.0.0/0"),
                Some("palisade:other/smtp"),
            ),
            cur(
                "sgr-6",
                Direction::Egress,
                SgPermission::default_egress()[0].clone(),
                None,
            ),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Adopted);
        assert_eq!(diff.ingress.authorize, []);
        assert_eq!(diff.ingress.revoke, ["sgr-3"]);
        assert_eq!(
            diff.ingress.update_descriptions,
            BTreeMap::from([("sgr-4".into(), "palisade:web/ssh".into())])
        );
        assert_eq!(
            diff.ingress.satisfied_by_foreign,
            [ForeignMatch {
                permission: tcp(80, "0.0.0.0/0"),
                rule_id: "sgr-1".into()
            }]
        );
        assert!(diff.egress.is_empty(), "egress is not spoken for");
    }

    #[test]
    fn created_group_revokes_drift_and_default_egress_in_enforce() {
        let p = policy(
            "web",
            vec![],
            Some(vec![rule("https", Protocol::Tcp, &[443], &["0.0.0.0/0"])]),
        );
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let current = vec![
            cur(
                "sgr-1",
                Direction::Egress,
                SgPermission::default_egress()[0].clone(),
                None,
            ),
            cur(
                "sgr-2",
                Direction::Ingress,
                tcp(3389, "0.0.0.0/0"),
                Some("added by hand"),
            ),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Created);
        assert_eq!(diff.egress.revoke, ["sgr-1"]);
        assert_eq!(diff.egress.authorize.len(), 1);
        assert_eq!(
            diff.ingress.revoke,
            ["sgr-2"],
            "ingress: [] is default-deny"
        );
    }

    #[test]
    fn audit_never_revokes_default_egress() {
        let mut p = policy(
            "web",
            vec![],
            Some(vec![rule("https", Protocol::Tcp, &[443], &["0.0.0.0/0"])]),
        );
        p.spec.mode = PolicyMode::Audit;
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let current = vec![
            cur(
                "sgr-1",
                Direction::Egress,
                SgPermission::default_egress()[0].clone(),
                None,
            ),
            cur(
                "sgr-2",
                Direction::Egress,
                SgPermission::default_egress()[1].clone(),
                None,
            ),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Created);
        assert_eq!(diff.egress.revoke, Vec::<String>::new());
    }

    #[test]
    fn audit_desiring_default_egress_keeps_one_copy() {
        // Found by the property test: a plan that wants `all ::/0` itself
        // keeps one owned copy and revokes the other.
        let mut p = policy(
            "pol",
            vec![],
            Some(vec![rule("out0", Protocol::All, &[], &["::/0"])]),
        );
        p.spec.ingress = None;
        p.spec.mode = PolicyMode::Audit;
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let all6 = SgPermission::default_egress()[1].clone();
        let current = vec![
            cur(
                "sgr-0",
                Direction::Egress,
                all6.clone(),
                Some("palisade:pol/old"),
            ),
            cur("sgr-1", Direction::Egress, all6, Some("palisade:pol/old")),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Created);
        assert_eq!(diff.egress.revoke, ["sgr-1"]);
        assert_eq!(diff.egress.update_descriptions.len(), 1);
        assert!(
            diff_security_group(&plan, &diff.apply_to(&current), GroupOwnership::Created)
                .is_empty()
        );
    }

    #[test]
    fn direction_no_longer_spoken_for_revokes_marked_rules_only() {
        let plan = web_plan();
        let current = vec![
            cur(
                "sgr-1",
                Direction::Egress,
                tcp(443, "0.0.0.0/0"),
                Some("palisade:web/https"),
            ),
            cur(
                "sgr-2",
                Direction::Egress,
                SgPermission::default_egress()[0].clone(),
                None,
            ),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Created);
        assert_eq!(diff.egress.revoke, ["sgr-1"]);
    }

    #[test]
    fn applied_diff_is_a_fixed_point() {
        let plan = web_plan();
        let current = vec![
            cur(
                "sgr-1",
                Direction::Ingress,
                tcp(23, "0.0.0.0/0"),
                Some("palisade:web/telnet"),
            ),
            cur("sgr-2", Direction::Ingress, tcp(80, "0.0.0.0/0"), None),
            cur("sgr-3", Direction::Ingress, tcp(80, "0.0.0.0/0"), None),
        ];
        let diff = diff_security_group(&plan, &current, GroupOwnership::Created);
        assert_eq!(
            diff.ingress.revoke,
            ["sgr-1", "sgr-3"],
            "a duplicate owned rule goes too"
        );
        assert_eq!(diff.peak_rules(Direction::Ingress, &current), (4, 0));
        let after = diff.apply_to(&current);
        assert!(diff_security_group(&plan, &after, GroupOwnership::Created).is_empty());
    }
}
