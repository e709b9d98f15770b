//! [`Ec2`] over `aws-sdk-ec2`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
use aws_sdk_ec2::operation::describe_network_interfaces::DescribeNetworkInterfacesOutput;
use aws_sdk_ec2::operation::describe_security_group_rules::DescribeSecurityGroupRulesOutput;
use aws_sdk_ec2::operation::describe_security_groups::DescribeSecurityGroupsOutput;
use aws_sdk_ec2::operation::get_managed_prefix_list_entries::GetManagedPrefixListEntriesOutput;
use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, PrefixListId, ResourceType, SecurityGroupRuleRequest,
    SecurityGroupRuleUpdate, Tag, TagSpecification, UserIdGroupPair,
};
use ipnet::IpNet;

use super::retry::RetryPolicy;
use super::{
    CloudError, Ec2, EniInfo, ErrorKind, GroupInfo, InstanceInfo, MAX_FILTER_VALUES, NewGroup,
    classify, tags,
};
use crate::policy::{
    CurrentSgRule, Direction, IpFamily, PlannedPermission, PrefixListFacts, SgPeer, SgPermission,
    sgdiff::AwsRuleFields,
};

/// Sees every EC2 attempt: the operation and its outcome (`ok` or an
/// [`ErrorKind::label`]). The controller's metrics implement it.
pub type CallObserver = Arc<dyn Fn(&'static str, &'static str) + Send + Sync>;

/// The EC2 API through `aws-sdk-ec2`, with our retry.
#[derive(Clone)]
pub struct AwsEc2 {
    client: Client,
    retry: RetryPolicy,
    observer: Option<CallObserver>,
}

impl std::fmt::Debug for AwsEc2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsEc2")
            .field("retry", &self.retry)
            .finish()
    }
}

fn sdk_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let kind = match &err {
        SdkError::ServiceError(_) => classify(err.code(), status),
        SdkError::ResponseError(_) => classify(None, status),
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => ErrorKind::Transient,
        _ => classify(err.code(), status),
    };
    let message = match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => DisplayErrorContext(&err).to_string(),
    };
    CloudError::new(operation, kind, message)
}

fn host_net(ip: &str) -> Option<IpNet> {
    ip.parse::<IpAddr>().ok().map(IpNet::from)
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn group_info(g: &aws_sdk_ec2::types::SecurityGroup) -> GroupInfo {
    GroupInfo {
        id: g.group_id().unwrap_or_default().to_string(),
        name: g.group_name().unwrap_or_default().to_string(),
        vpc_id: g.vpc_id().map(str::to_string),
        tags: tag_map(g.tags()),
    }
}

/// One `IpPermission` carrying a single permission and its description.
fn ip_permission(p: &SgPermission, description: &str) -> IpPermission {
    let b = IpPermission::builder()
        .ip_protocol(p.protocol.aws_name())
        .from_port(p.from_port)
        .to_port(p.to_port);
    match &p.peer {
        SgPeer::Ipv4(n) => b.ip_ranges(
            IpRange::builder()
                .cidr_ip(n.to_string())
                .description(description)
                .build(),
        ),
        SgPeer::Ipv6(n) => b.ipv6_ranges(
            Ipv6Range::builder()
                .cidr_ipv6(n.to_string())
                .description(description)
                .build(),
        ),
        SgPeer::SecurityGroup(g) => b.user_id_group_pairs(
            UserIdGroupPair::builder()
                .group_id(g)
                .description(description)
                .build(),
        ),
        SgPeer::PrefixList(pl) => b.prefix_list_ids(
            PrefixListId::builder()
                .prefix_list_id(pl)
                .description(description)
                .build(),
        ),
    }
    .build()
}

fn rule_request(p: &SgPermission, description: &str) -> SecurityGroupRuleRequest {
    let b = SecurityGroupRuleRequest::builder()
        .ip_protocol(p.protocol.aws_name())
        .from_port(p.from_port)
        .to_port(p.to_port)
        .description(description);
    match &p.peer {
        SgPeer::Ipv4(n) => b.cidr_ipv4(n.to_string()),
        SgPeer::Ipv6(n) => b.cidr_ipv6(n.to_string()),
        SgPeer::SecurityGroup(g) => b.referenced_group_id(g),
        SgPeer::PrefixList(pl) => b.prefix_list_id(pl),
    }
    .build()
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

impl AwsEc2 {
    /// Wraps an SDK client. The client's own retries should be disabled
    /// ([`AwsEc2::from_sdk_config`] does it); ours replace them.
    pub fn new(client: Client, retry: RetryPolicy) -> Self {
        AwsEc2 {
            client,
            retry,
            observer: None,
        }
    }

    /// Builds a client from an SDK config (credentials, region, endpoint)
    /// with the SDK's retries off.
    pub fn from_sdk_config(config: &aws_config::SdkConfig, retry: RetryPolicy) -> Self {
        let conf = aws_sdk_ec2::config::Builder::from(config)
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .build();
        AwsEc2::new(Client::from_conf(conf), retry)
    }

    /// Loads the SDK's standard chain (environment, profile, IRSA, EKS Pod
    /// Identity, instance profile; `AWS_ENDPOINT_URL_EC2` honoured), with
    /// `region` overriding the chain's region when given.
    pub async fn from_env(region: Option<String>, retry: RetryPolicy) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        let config = loader.load().await;
        AwsEc2::from_sdk_config(&config, retry)
    }

    /// Reports every attempt to `observer`.
    pub fn with_observer(mut self, observer: CallObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    async fn call<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, CloudError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, CloudError>>,
    {
        let observer = self.observer.clone();
        let result = self
            .retry
            .run(call, |outcome| {
                if let Some(observe) = &observer {
                    observe(operation, outcome.map_or("ok", |e| e.kind.label()));
                }
            })
            .await;
        if let Err(e) = &result {
            tracing::debug!(operation, error = %e, "EC2 call failed");
        }
        result
    }

    /// Every page of a paginated call: `request(token)` makes one request
    /// (each page retried by [`AwsEc2::call`]), until EC2 returns no
    /// next token. The pages, in order.
    async fn pages<O, F, Fut>(
        &self,
        operation: &'static str,
        mut request: F,
        next_token: fn(&O) -> Option<&str>,
    ) -> Result<Vec<O>, CloudError>
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<O, CloudError>>,
    {
        let mut pages = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.call(operation, || request(token.clone())).await?;
            token = next_token(&page)
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            pages.push(page);
            if token.is_none() {
                return Ok(pages);
            }
        }
    }
}

/// Every page of `self.client.$method()`, set up by `$setup` (given the
/// request builder), through [`AwsEc2::pages`]: each page retried.
macro_rules! all_pages {
    ($self:ident, $op:expr, $method:ident, $output:ty, |$b:ident| $setup:expr) => {
        $self
            .pages(
                $op,
                |token| {
                    let $b = $self.client.$method().set_next_token(token);
                    let request = $setup;
                    async move { request.send().await.map_err(|e| sdk_error($op, e)) }
                },
                <$output>::next_token,
            )
            .await
    };
}

impl Ec2 for AwsEc2 {
    async fn find_groups(
        &self,
        wanted: &BTreeMap<String, String>,
    ) -> Result<Vec<GroupInfo>, CloudError> {
        let filters: Vec<Filter> = wanted.iter().map(|(k, v)| tag_filter(k, v)).collect();
        self.groups_matching(filters).await
    }

    async fn find_groups_any(
        &self,
        wanted: &BTreeMap<String, String>,
        key: &str,
        values: &[String],
    ) -> Result<Vec<GroupInfo>, CloudError> {
        let mut out: Vec<GroupInfo> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        // EC2 takes at most MAX_FILTER_VALUES values in one filter.
        for chunk in values.chunks(MAX_FILTER_VALUES) {
            let mut filters: Vec<Filter> = wanted.iter().map(|(k, v)| tag_filter(k, v)).collect();
            filters.push(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .set_values(Some(chunk.to_vec()))
                    .build(),
            );
            for g in self.groups_matching(filters).await? {
                if seen.insert(g.id.clone()) {
                    out.push(g);
                }
            }
        }
        Ok(out)
    }

    async fn describe_groups(&self, ids: &[String]) -> Result<Vec<GroupInfo>, CloudError> {
        const OP: &str = "DescribeSecurityGroups";
        let mut groups = Vec::new();
        // EC2 takes at most MAX_FILTER_VALUES ids per call.
        for chunk in ids.chunks(MAX_FILTER_VALUES) {
            let out = self
                .call(OP, || async {
                    self.client
                        .describe_security_groups()
                        .set_group_ids(Some(chunk.to_vec()))
                        .send()
                        .await
                        .map_err(|e| sdk_error(OP, e))
                })
                .await?;
            groups.extend(out.security_groups().iter().map(group_info));
        }
        Ok(groups)
    }

    async fn describe_rules(&self, group_id: &str) -> Result<Vec<CurrentSgRule>, CloudError> {
        const OP: &str = "DescribeSecurityGroupRules";
        let filter = Filter::builder().name("group-id").values(group_id).build();
        let pages = all_pages!(
            self,
            OP,
            describe_security_group_rules,
            DescribeSecurityGroupRulesOutput,
            |b| b.filters(filter.clone())
        )?;
        let mut rules = Vec::new();
        for r in pages.iter().flat_map(|page| page.security_group_rules()) {
            if r.group_id().is_some_and(|g| g != group_id) {
                continue;
            }
            let fields = AwsRuleFields {
                rule_id: r.security_group_rule_id().unwrap_or_default(),
                is_egress: r.is_egress().unwrap_or(false),
                ip_protocol: r.ip_protocol().unwrap_or("-1"),
                from_port: r.from_port(),
                to_port: r.to_port(),
                cidr_ipv4: r.cidr_ipv4(),
                cidr_ipv6: r.cidr_ipv6(),
                referenced_group_id: r.referenced_group_info().and_then(|g| g.group_id()),
                prefix_list_id: r.prefix_list_id(),
                description: r.description(),
            };
            let rule = CurrentSgRule::from_aws(&fields).map_err(|e| {
                CloudError::new(OP, ErrorKind::Invalid, format!("in {group_id}: {e}"))
            })?;
            rules.push(rule);
        }
        rules.sort();
        Ok(rules)
    }

    async fn authorize(
        &self,
        group_id: &str,
        direction: Direction,
        permissions: &[PlannedPermission],
        policy: &str,
    ) -> Result<Vec<String>, CloudError> {
        if permissions.is_empty() {
            return Ok(Vec::new());
        }
        let perms: Vec<IpPermission> = permissions
            .iter()
            .map(|p| ip_permission(&p.permission, &p.description))
            .collect();
        let tagging = TagSpecification::builder()
            .resource_type(ResourceType::SecurityGroupRule)
            .tags(Tag::builder().key(tags::POLICY).value(policy).build())
            .build();
        let ids: Vec<String> = match direction {
            Direction::Ingress => {
                const OP: &str = "AuthorizeSecurityGroupIngress";
                self.call(OP, || async {
                    self.client
                        .authorize_security_group_ingress()
                        .group_id(group_id)
                        .set_ip_permissions(Some(perms.clone()))
                        .tag_specifications(tagging.clone())
                        .send()
                        .await
                        .map_err(|e| sdk_error(OP, e))
                })
                .await?
                .security_group_rules()
                .iter()
                .filter_map(|r| r.security_group_rule_id().map(str::to_string))
                .collect()
            }
            Direction::Egress => {
                const OP: &str = "AuthorizeSecurityGroupEgress";
                self.call(OP, || async {
                    self.client
                        .authorize_security_group_egress()
                        .group_id(group_id)
                        .set_ip_permissions(Some(perms.clone()))
                        .tag_specifications(tagging.clone())
                        .send()
                        .await
                        .map_err(|e| sdk_error(OP, e))
                })
                .await?
                .security_group_rules()
                .iter()
                .filter_map(|r| r.security_group_rule_id().map(str::to_string))
                .collect()
            }
        };
        Ok(ids)
    }

    async fn revoke(
        &self,
        group_id: &str,
        direction: Direction,
        rule_ids: &[String],
    ) -> Result<(), CloudError> {
        if rule_ids.is_empty() {
            return Ok(());
        }
        match direction {
            Direction::Ingress => {
                const OP: &str = "RevokeSecurityGroupIngress";
                self.call(OP, || async {
                    self.client
                        .revoke_security_group_ingress()
                        .group_id(group_id)
                        .set_security_group_rule_ids(Some(rule_ids.to_vec()))
                        .send()
                        .await
                        .map_err(|e| sdk_error(OP, e))
                })
                .await?;
            }
            Direction::Egress => {
                const OP: &str = "RevokeSecurityGroupEgress";
                self.call(OP, || async {
                    self.client
                        .revoke_security_group_egress()
                        .group_id(group_id)
                        .set_security_group_rule_ids(Some(rule_ids.to_vec()))
                        .send()
                        .await
                        .map_err(|e| sdk_error(OP, e))
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn update_descriptions(
        &self,
        group_id: &str,
        rules: &[(CurrentSgRule, String)],
    ) -> Result<(), CloudError> {
        const OP: &str = "ModifySecurityGroupRules";
        if rules.is_empty() {
            return Ok(());
        }
        let updates: Vec<SecurityGroupRuleUpdate> = rules
            .iter()
            .map(|(rule, description)| {
                SecurityGroupRuleUpdate::builder()
                    .security_group_rule_id(&rule.rule_id)
                    .security_group_rule(rule_request(&rule.permission, description))
                    .build()
            })
            .collect();
        self.call(OP, || async {
            self.client
                .modify_security_group_rules()
                .group_id(group_id)
                .set_security_group_rules(Some(updates.clone()))
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))
        })
        .await?;
        Ok(())
    }

    async fn create_group(&self, group: &NewGroup) -> Result<String, CloudError> {
        const OP: &str = "CreateSecurityGroup";
        let mut tagging = TagSpecification::builder().resource_type(ResourceType::SecurityGroup);
        for (k, v) in &group.tags {
            tagging = tagging.tags(Tag::builder().key(k).value(v).build());
        }
        let tagging = tagging.build();
        let out = self
            .call(OP, || async {
                self.client
                    .create_security_group()
                    .group_name(&group.name)
                    .description(&group.description)
                    .vpc_id(&group.vpc_id)
                    .tag_specifications(tagging.clone())
                    .send()
                    .await
                    .map_err(|e| sdk_error(OP, e))
            })
            .await?;
        out.group_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::new(OP, ErrorKind::Invalid, "no GroupId in the answer"))
    }

    async fn delete_group(&self, group_id: &str) -> Result<(), CloudError> {
        const OP: &str = "DeleteSecurityGroup";
        self.call(OP, || async {
            self.client
                .delete_security_group()
                .group_id(group_id)
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))
        })
        .await?;
        Ok(())
    }

    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, CloudError> {
        let mut out = Vec::new();
        // EC2 refuses more than MAX_FILTER_VALUES values in one filter.
        for chunk in ids.chunks(MAX_FILTER_VALUES) {
            out.extend(self.describe_instance_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn eni_groups(&self, eni: &str) -> Result<Vec<String>, CloudError> {
        const OP: &str = "DescribeNetworkInterfaces";
        let out = self
            .call(OP, || async {
                self.client
                    .describe_network_interfaces()
                    .network_interface_ids(eni)
                    .send()
                    .await
                    .map_err(|e| sdk_error(OP, e))
            })
            .await?;
        let interface = out.network_interfaces().first().ok_or_else(|| {
            CloudError::new(
                OP,
                ErrorKind::NotFound {
                    what: "InvalidNetworkInterfaceID.NotFound".into(),
                },
                format!("network interface {eni} not found"),
            )
        })?;
        Ok(interface
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect())
    }

    async fn set_eni_groups(&self, eni: &str, groups: &[String]) -> Result<(), CloudError> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        self.call(OP, || async {
            self.client
                .modify_network_interface_attribute()
                .network_interface_id(eni)
                .set_groups(Some(groups.to_vec()))
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))
        })
        .await?;
        Ok(())
    }

    async fn enis_in_group(&self, group_id: &str) -> Result<Vec<EniInfo>, CloudError> {
        self.enis_in_groups(&[group_id.to_string()]).await
    }

    async fn enis_in_groups(&self, group_ids: &[String]) -> Result<Vec<EniInfo>, CloudError> {
        Ok(self
            .interfaces_in_groups(group_ids)
            .await?
            .into_iter()
            .map(|(eni, _)| eni)
            .collect())
    }

    async fn groups_of_enis(
        &self,
        enis: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, CloudError> {
        // A filter, not `NetworkInterfaceId.N`: an interface gone is left
        // out instead of failing the whole call.
        Ok(self
            .interfaces_where("network-interface-id", enis)
            .await?
            .iter()
            .filter_map(|ni| {
                let groups = ni
                    .groups()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_string))
                    .collect();
                Some((ni.network_interface_id()?.to_string(), groups))
            })
            .collect())
    }

    async fn tag_eni(&self, eni: &str, key: &str, value: &str) -> Result<(), CloudError> {
        const OP: &str = "CreateTags";
        self.call(OP, || async {
            self.client
                .create_tags()
                .resources(eni)
                .tags(Tag::builder().key(key).value(value).build())
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))
        })
        .await?;
        Ok(())
    }

    async fn untag_eni(&self, eni: &str, key: &str) -> Result<(), CloudError> {
        const OP: &str = "DeleteTags";
        self.call(OP, || async {
            self.client
                .delete_tags()
                .resources(eni)
                .tags(Tag::builder().key(key).build())
                .send()
                .await
                .map_err(|e| sdk_error(OP, e))
        })
        .await?;
        Ok(())
    }

    async fn group_members(
        &self,
        group_ids: &[String],
    ) -> Result<BTreeMap<String, Vec<IpNet>>, CloudError> {
        let mut out = BTreeMap::new();
        for id in group_ids {
            let mut nets: Vec<IpNet> = self
                .interfaces_in_groups(std::slice::from_ref(id))
                .await?
                .into_iter()
                .flat_map(|(_, ips)| ips)
                .collect();
            nets.sort();
            nets.dedup();
            out.insert(id.clone(), nets);
        }
        Ok(out)
    }

    async fn prefix_lists(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<String, PrefixListFacts>, CloudError> {
        const OP: &str = "DescribeManagedPrefixLists";
        const ENTRIES: &str = "GetManagedPrefixListEntries";
        let mut out = BTreeMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let lists = self
            .call(OP, || async {
                self.client
                    .describe_managed_prefix_lists()
                    .set_prefix_list_ids(Some(ids.to_vec()))
                    .send()
                    .await
                    .map_err(|e| sdk_error(OP, e))
            })
            .await?;
        for list in lists.prefix_lists() {
            let Some(id) = list.prefix_list_id() else {
                continue;
            };
            let family = if list.address_family() == Some("IPv6") {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let pages = all_pages!(
                self,
                ENTRIES,
                get_managed_prefix_list_entries,
                GetManagedPrefixListEntriesOutput,
                |b| b.prefix_list_id(id)
            )?;
            let cidrs: Vec<IpNet> = pages
                .iter()
                .flat_map(|page| page.entries())
                .filter_map(|e| e.cidr()?.parse::<IpNet>().ok())
                .collect();
            out.insert(
                id.to_string(),
                PrefixListFacts {
                    family,
                    cidrs,
                    max_entries: u32::try_from(list.max_entries().unwrap_or(0)).unwrap_or(0),
                },
            );
        }
        Ok(out)
    }
}

impl AwsEc2 {
    /// Every group matching all of `filters`, all pages.
    async fn groups_matching(&self, filters: Vec<Filter>) -> Result<Vec<GroupInfo>, CloudError> {
        const OP: &str = "DescribeSecurityGroups";
        let pages = all_pages!(
            self,
            OP,
            describe_security_groups,
            DescribeSecurityGroupsOutput,
            |b| b.set_filters(Some(filters.clone()))
        )?;
        Ok(pages
            .iter()
            .flat_map(|page| page.security_groups().iter().map(group_info))
            .collect())
    }

    /// One DescribeInstances of at most [`MAX_FILTER_VALUES`] ids, all pages.
    async fn describe_instance_chunk(
        &self,
        ids: &[String],
    ) -> Result<Vec<InstanceInfo>, CloudError> {
        const OP: &str = "DescribeInstances";
        let filter = Filter::builder()
            .name("instance-id")
            .set_values(Some(ids.to_vec()))
            .build();
        let pages = all_pages!(self, OP, describe_instances, DescribeInstancesOutput, |b| b
            .filters(filter.clone()))?;
        let mut out = Vec::new();
        for instance in pages
            .iter()
            .flat_map(|page| page.reservations())
            .flat_map(|r| r.instances())
        {
            let primary = instance
                .network_interfaces()
                .iter()
                .find(|ni| ni.attachment().and_then(|a| a.device_index()) == Some(0));
            let primary = primary.or(instance.network_interfaces().first());
            out.push(InstanceInfo {
                id: instance.instance_id().unwrap_or_default().to_string(),
                vpc_id: instance.vpc_id().map(str::to_string),
                primary_eni: primary
                    .and_then(|p| p.network_interface_id())
                    .map(str::to_string),
                private_ips: primary
                    .map(|p| {
                        p.private_ip_addresses()
                            .iter()
                            .filter_map(|a| a.private_ip_address().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                eni_groups: primary
                    .map(|p| {
                        p.groups()
                            .iter()
                            .filter_map(|g| g.group_id().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// The interfaces matching `filter` = any of `values`, each once: one
    /// filter of at most [`MAX_FILTER_VALUES`] values per request, every
    /// page.
    async fn interfaces_where(
        &self,
        filter: &str,
        values: &[String],
    ) -> Result<Vec<aws_sdk_ec2::types::NetworkInterface>, CloudError> {
        const OP: &str = "DescribeNetworkInterfaces";
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for chunk in values.chunks(MAX_FILTER_VALUES) {
            let f = Filter::builder()
                .name(filter)
                .set_values(Some(chunk.to_vec()))
                .build();
            let pages = all_pages!(
                self,
                OP,
                describe_network_interfaces,
                DescribeNetworkInterfacesOutput,
                |b| b.filters(f.clone())
            )?;
            for ni in pages.iter().flat_map(|page| page.network_interfaces()) {
                if seen.insert(ni.network_interface_id().unwrap_or_default().to_string()) {
                    out.push(ni.clone());
                }
            }
        }
        Ok(out)
    }

    /// Interfaces whose groups include one of `group_ids`: (id, groups,
    /// addresses).
    async fn interfaces_in_groups(
        &self,
        group_ids: &[String],
    ) -> Result<Vec<(EniInfo, Vec<IpNet>)>, CloudError> {
        let interfaces = self.interfaces_where("group-id", group_ids).await?;
        let mut out = Vec::new();
        for ni in &interfaces {
            let groups: Vec<String> = ni
                .groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect();
            if !groups.iter().any(|g| group_ids.contains(g)) {
                continue;
            }
            let mut ips: Vec<IpNet> = ni
                .private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address().and_then(host_net))
                .collect();
            ips.extend(
                ni.ipv6_addresses()
                    .iter()
                    .filter_map(|a| a.ipv6_address().and_then(host_net)),
            );
            let eni = EniInfo {
                id: ni.network_interface_id().unwrap_or_default().to_string(),
                groups,
                instance_id: ni
                    .attachment()
                    .and_then(|a| a.instance_id())
                    .map(str::to_string),
                tags: ni
                    .tag_set()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect(),
            };
            out.push((eni, ips));
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The SDK glue against a scripted EC2 endpoint on loopback: pagination
    //! is followed to the end, and a throttled answer is retried.

    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    const THROTTLED: &str = "<Response><Errors><Error><Code>RequestLimitExceeded</Code>\
        <Message>Request limit exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>";

    fn page(rule: &str, port: u16, token: Option<&str>) -> String {
        format!(
            "<DescribeSecurityGroupRulesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
             <requestId>r</requestId><securityGroupRuleSet><item>\
             <securityGroupRuleId>{rule}</securityGroupRuleId><groupId>sg-1</groupId>\
             <isEgress>false</isEgress><ipProtocol>tcp</ipProtocol><fromPort>{port}</fromPort>\
             <toPort>{port}</toPort><cidrIpv4>10.0.0.0/8</cidrIpv4>\
             <description>palisade:p/r{port}</description></item></securityGroupRuleSet>{}\
             </DescribeSecurityGroupRulesResponse>",
            token.map_or(String::new(), |t| format!("<nextToken>{t}</nextToken>"))
        )
    }

    /// Answers: throttled, page 1 (token), page 2. Records request bodies.
    async fn scripted() -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body = String::from_utf8_lossy(&body).to_string();
                            let n = {
                                let mut seen = record.lock().unwrap();
                                seen.push(body.clone());
                                seen.len()
                            };
                            let (status, text) = match n {
                                1 => (503, THROTTLED.to_string()),
                                _ if body.contains("NextToken=t1") => {
                                    (200, page("sgr-2", 443, None))
                                }
                                _ => (200, page("sgr-1", 22, Some("t1"))),
                            };
                            let mut response = Response::new(Full::new(Bytes::from(text)));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    #[tokio::test]
    async fn rules_are_read_across_pages_after_a_throttle() {
        let (endpoint, seen) = scripted().await;
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
                aws_sdk_ec2::config::Credentials::new("a", "b", None, None, "test"),
            ))
            .build();
        let outcomes = std::sync::Arc::new(Mutex::new(Vec::new()));
        let o = outcomes.clone();
        let retry = RetryPolicy {
            sleep: std::sync::Arc::new(|_| Box::pin(async {})),
            base: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let ec2 = AwsEc2::from_sdk_config(&config, retry).with_observer(std::sync::Arc::new(
            move |op, outcome| o.lock().unwrap().push(format!("{op}:{outcome}")),
        ));
        let rules = ec2.describe_rules("sg-1").await.unwrap();
        let ids: Vec<&str> = rules.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(ids, ["sgr-1", "sgr-2"]);
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(
            *outcomes.lock().unwrap(),
            [
                "DescribeSecurityGroupRules:throttled",
                "DescribeSecurityGroupRules:ok",
                "DescribeSecurityGroupRules:ok"
            ]
        );
    }
}
